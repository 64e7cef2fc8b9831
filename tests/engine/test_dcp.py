"""Sharded (DCP) training checkpoints: resume at another world size and across backends, asynchronous saves,
deferred hashing, export to Hugging Face, and no code execution when reading one.

The launching tests (slow) compare against one uninterrupted process reading the same global batch of 6 rows
(1 x 6 = 2 x 3 = 3 x 2): a checkpoint written by 2 FSDP2 ranks (asynchronously) resumes with 1 process
(`distributed=none`) and with 3 FSDP2 ranks, and one written by a plain single process resumes with 2 FSDP2
ranks. Per-step loss within 1e-5 and final weights within 1e-5 of the uninterrupted run.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

import lfm2_train.engine.dcp as dcp_mod
from lfm2_train.config import register_configs
from lfm2_train.engine.checkpoint import CHECKSUMS, DEFERRED, CheckpointError, CheckpointManager
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.stages import run_stage

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 400
TOL = 1e-5
BASE = ["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.max_steps=4", "data.seq_len=32",
        "trainer.eval_every=0", "trainer.checkpoint_every=0", "optim.warmup_steps=1", "optim.lr=3e-4",
        "optim.min_lr=3e-5", "optim.grad_clip=1.0", "trainer.grad_accum=1"]
GLOBAL_ROWS = 6


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               WANDB_MODE="disabled", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", CUDA_VISIBLE_DEVICES="")
    return env


def _overrides(data: Path, out: Path, world: int, *extra: str) -> list[str]:
    return [*BASE, f"data.path={data}", f"output_dir={out}", f"trainer.micro_batch_size={GLOBAL_ROWS // world}",
            *extra]


def _cfg(overrides: list[str]):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=overrides)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return LFM2ForCausalLM.from_pretrained(out / "final").state_dict()


def _assert_same_run(got: Path, want: Path, what: str) -> None:
    g, w = _losses(got), _losses(want)
    assert sorted(g) == sorted(w) == [1, 2, 3, 4], f"{what}: logged steps {sorted(g)}"
    loss_diff = max(abs(g[s] - w[s]) for s in w)
    a, b = _weights(got), _weights(want)
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in b)
    print(f"\n{what}: max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}")
    assert loss_diff < TOL and weight_diff < TOL, what


# ---------------------------------------------------------------------------------------------- in process
def test_async_checkpoint_changes_no_number_and_resumes(tmp_path, tiny_dataset):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    run_stage(_cfg(_overrides(tiny_dataset, sync, 1, "trainer.checkpoint_every=1")))
    run_stage(_cfg(_overrides(tiny_dataset, asyn, 1, "trainer.checkpoint_every=1", "trainer.async_checkpoint=true",
                              "trainer.stop_after_steps=2")))
    assert (asyn / "checkpoints" / "step-00000002" / CHECKSUMS).is_file()
    assert CheckpointManager.verify(asyn / "checkpoints" / "step-00000002") is None
    run_stage(_cfg(_overrides(tiny_dataset, asyn, 1, "trainer.checkpoint_every=1", "trainer.async_checkpoint=true")))
    assert _losses(asyn) == _losses(sync)
    a, b = _weights(asyn), _weights(sync)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_export_checkpoint_gives_the_weights_of_that_step(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    run_stage(_cfg(_overrides(tiny_dataset, out, 1)))
    exported = tmp_path / "hf"
    assert dcp_mod.main([str(out / "checkpoints" / "step-00000004"), str(exported)]) == 0
    got, want = LFM2ForCausalLM.from_pretrained(exported).state_dict(), _weights(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (exported / "tokenizer.json").is_file()
    with pytest.raises(CheckpointError, match="no dcp/"):
        dcp_mod.export_checkpoint(exported, tmp_path / "nope")


def test_stage_export_takes_a_training_checkpoint(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    run_stage(_cfg(_overrides(tiny_dataset, out, 1)))
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=[
            "stage=export", "logger=disabled", f"output_dir={tmp_path / 'export'}",
            f"stage.source={out / 'checkpoints' / 'step-00000004'}", "stage.check_transformers=false"])
    summary = run_stage(cfg)
    got, want = LFM2ForCausalLM.from_pretrained(summary["final"]).state_dict(), _weights(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_object_in_a_dcp_item_is_refused_before_it_runs(tmp_path):
    """DCP stores non-tensor values with torch.save and would read them back with weights_only=False."""
    marker = tmp_path / "pwned"
    dcp_mod.save({"w": torch.ones(3), "extra": {"obj": _Planted(str(marker))}}, tmp_path / "ckpt")
    assert not marker.exists()
    state = {"w": torch.zeros(3), "extra": {"obj": None}}
    with pytest.raises(CheckpointError, match="extra.obj holds something other than plain values"):
        dcp_mod.load(state, tmp_path / "ckpt")
    assert not marker.exists()
    meta = pickle.dumps(_Planted(str(marker)))
    (tmp_path / "ckpt" / ".metadata").write_bytes(meta)
    with pytest.raises(CheckpointError, match="holds something other than DCP metadata"):
        dcp_mod.load(state, tmp_path / "ckpt")
    assert not marker.exists()


def test_metadata_of_a_real_checkpoint_reads_with_the_restricted_unpickler(tmp_path):
    model = torch.nn.Linear(4, 4)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optim.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m, o = get_state_dict(model, optim)
    dcp_mod.save({"model": m, "optim": o}, tmp_path)
    plain = pickle.load(io.BytesIO((tmp_path / ".metadata").read_bytes()))
    safe = dcp_mod.read_metadata(tmp_path / ".metadata")
    assert safe.state_dict_metadata.keys() == plain.state_dict_metadata.keys()


def test_large_files_are_hashed_after_the_rename(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    big = os.urandom(2 << 20)
    path = mgr.save(1, lambda d: ((d / "shard.distcp").write_bytes(big), (d / "small.json").write_text("{}")))
    manifest = json.loads((path / CHECKSUMS).read_text())
    assert manifest["shard.distcp"] == {"size": len(big)} and isinstance(manifest["small.json"], str)
    mgr.wait()
    assert set(json.loads((path / DEFERRED).read_text())) == {"shard.distcp"}
    assert CheckpointManager.verify(path) is None
    flipped = bytearray(big)
    flipped[12345] ^= 1
    (path / "shard.distcp").write_bytes(bytes(flipped))
    assert CheckpointManager.verify(path) == "shard.distcp does not match its checksum"
    (path / DEFERRED).unlink()  # before the background hash exists, the size still catches a truncation
    (path / "shard.distcp").write_bytes(big[:-1])
    assert "shard.distcp does not match its checksum (size" in CheckpointManager.verify(path)


# ---------------------------------------------------------------------------------------------- launched
_WORKER = textwrap.dedent('''
    import json, sys
    from hydra import compose, initialize
    from lfm2_train.config import register_configs
    from lfm2_train.stages import run_stage

    register_configs()
    for overrides in json.loads(sys.argv[1]):
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name="lfm2_train", overrides=overrides)
        run_stage(cfg)
''')


def _launch(tmp: Path, world: int, jobs: list[list[str]]) -> float:
    script = tmp / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), str(script),
           json.dumps(jobs)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"{world}-process launch failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def resharded(tmp_path_factory, tiny_dataset) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reshard")
    runs = {name: root / name for name in ("reference", "fsdp2x2", "none", "2to1", "2to3")}
    data = tiny_dataset
    run_stage(_cfg(_overrides(data, runs["reference"], 1, "trainer.checkpoint_every=2")))
    run_stage(_cfg(_overrides(data, runs["none"], 1, "trainer.stop_after_steps=2")))
    fsdp = ["distributed=fsdp2"]
    seconds = _launch(root, 2, [
        _overrides(data, runs["fsdp2x2"], 2, *fsdp, "trainer.stop_after_steps=2", "trainer.async_checkpoint=true"),
        _overrides(data, runs["none"], 2, *fsdp),  # resume the single-process checkpoint on 2 FSDP2 ranks
    ])
    print(f"\n2-process launch (2 runs): {seconds:.1f}s")
    for name in ("2to1", "2to3"):
        shutil.copytree(runs["fsdp2x2"], runs[name])
    run_stage(_cfg(_overrides(data, runs["2to1"], 1)))
    seconds = _launch(root, 3, [_overrides(data, runs["2to3"], 3, *fsdp)])
    print(f"3-process launch: {seconds:.1f}s")
    return runs


@pytest.mark.slow
def test_checkpoint_of_two_fsdp2_ranks_resumes_on_one_process(resharded):
    state = json.loads((resharded["2to1"] / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    _assert_same_run(resharded["2to1"], resharded["reference"], "fsdp2 x2 (async save) -> none x1")


@pytest.mark.slow
def test_checkpoint_of_two_fsdp2_ranks_resumes_on_three(resharded):
    _assert_same_run(resharded["2to3"], resharded["reference"], "fsdp2 x2 (async save) -> fsdp2 x3")


@pytest.mark.slow
def test_single_process_checkpoint_resumes_on_two_fsdp2_ranks(resharded):
    summary = json.loads((resharded["none"] / "summary.json").read_text())
    assert summary["start_step"] == 2 and summary["steps"] == 4
    _assert_same_run(resharded["none"], resharded["reference"], "none x1 -> fsdp2 x2")


@pytest.mark.slow
def test_a_checkpoint_of_two_fsdp2_ranks_exports_the_weights_of_its_step(resharded, tmp_path):
    step2 = "checkpoints/step-00000002"
    got = LFM2ForCausalLM.from_pretrained(dcp_mod.export_checkpoint(resharded["fsdp2x2"] / step2, tmp_path / "a"))
    want = LFM2ForCausalLM.from_pretrained(dcp_mod.export_checkpoint(resharded["reference"] / step2, tmp_path / "b"))
    a, b = got.state_dict(), want.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in b) < TOL
