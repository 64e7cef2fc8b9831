"""LoRA under data parallelism on CPU (gloo, 2 processes): the same run as one process.

SFT with adapters from a saved tiny base, launched for real with `torch.distributed.run` (micro-batch 2 per
rank) and compared with one process reading the same global batch (micro-batch 4): per-step loss within
1e-5 and the adapter tensors within 1e-5. DDP stops after step 2 and resumes in a second launch (adapter-only
checkpoint, resumed by 2 ranks); FSDP2 shards the frozen base with the adapters. A low LR keeps Adam's
near-eps hypersensitivity below the tolerance (see test_distributed.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from torch.distributed.checkpoint import FileSystemReader

from lfm2_train.config import register_configs
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.model.peft_io import read_adapter_state
from lfm2_train.stages import run_stage
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
COMMON = ["stage=sft", "logger=disabled", "trainer.progress_bar=false", "data.seq_len=48", "stage.bundled_rows=120",
          "stage.epochs=null", "trainer.max_steps=4", "trainer.eval_every=0", "trainer.checkpoint_every=0",
          "optim.lr=3e-4", "optim.min_lr=3e-5", "optim.warmup_steps=1", "model.lora.r=4",
          "model.lora.init_lora_weights=gaussian", "model.lora.target_modules=[q_proj,v_proj,in_proj,w1,w2,w3]"]


def _launch(out: Path, overrides: list[str], interrupted: bool = False) -> None:
    """One 2-process launch; an interrupted run exits non-zero (torchrun reports its workers' exit code 75 as a
    failure), so there the summary it wrote is what the caller checks."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="disabled", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lfm2_train",
           *overrides, f"output_dir={out}", f"hydra.run.dir={out}/hydra"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and not interrupted:
        pytest.fail(f"{' '.join(overrides)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _assert_same(got: Path, want: Path, what: str) -> None:
    g, w = _metrics(got), _metrics(want)
    assert sorted(g) == sorted(w), what
    for s in w:
        assert g[s]["tokens"] == w[s]["tokens"] and g[s]["lr"] == w[s]["lr"], f"{what}: step {s}"
        assert abs(g[s]["loss"] - w[s]["loss"]) < TOL, f"{what}: step {s} loss {g[s]['loss']} != {w[s]['loss']}"
    a, b = read_adapter_state(got / "final"), read_adapter_state(want / "final")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < TOL, f"{what}: adapters differ by {diff:.2e}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_dp")
    base = root / "base"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(base)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(base)
    overrides = [*COMMON, f"model.init_from={base}"]
    single = root / "single"
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=[*overrides, "trainer.micro_batch_size=4",
                                                             f"output_dir={single}"])
    run_stage(cfg)
    return overrides, single


@pytest.mark.slow
def test_ddp_lora_interrupted_and_resumed_matches_one_process(tmp_path, setup):
    overrides, single = setup
    run = [*overrides, "trainer.micro_batch_size=2", "distributed=ddp"]
    _launch(tmp_path, [*run, "trainer.stop_after_steps=2"], interrupted=True)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"
    _launch(tmp_path, run)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["start_step"] == 2 and summary["status"] == "finished"
    _assert_same(tmp_path, single, "ddp + resume")


@pytest.mark.slow
def test_fsdp2_lora_matches_one_process(tmp_path, setup):
    overrides, single = setup
    _launch(tmp_path, [*overrides, "trainer.micro_batch_size=2", "distributed=fsdp2", "trainer.checkpoint_every=2"])
    stored = FileSystemReader(str(tmp_path / "checkpoints" / "step-00000002" / "dcp")).read_metadata()
    model_keys = [k for k in stored.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys)  # the sharded checkpoint holds the adapters only
    _assert_same(tmp_path, single, "fsdp2")
