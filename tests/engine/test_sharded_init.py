"""FSDP2 builds the model on the meta device, shards it, then initialises it shard by shard: the initial full
state dict equals the eager one-process init for the same seed (parameters and buffers, bit for bit), and
with `trainer.precision=bf16` FSDP2 computes with bf16 parameters while the sharded master weights and the
optimizer state stay fp32. One 2-process gloo launch runs every check (slow: ~30 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.model.hf_io import write_checkpoint

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 300


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               WANDB_MODE="disabled", OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1", CUDA_VISIBLE_DEVICES="")
    return env

_WORKER = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    from hydra import compose, initialize
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from lfm2_train.config import register_configs
    from lfm2_train.engine.distributed import Runtime, TorchBackend
    from lfm2_train.engine.meta_init import build_on_meta
    from lfm2_train.model import get_preset
    from lfm2_train.model.hf_io import read_config

    out, init_from = Path(sys.argv[1]), sys.argv[2]
    register_configs()
    runtime = None
    report = {}
    for name, precision, source in [("tiny", "fp32", None), ("tiny_moe", "fp32", None), ("tiny", "bf16", None),
                                    ("loaded", "fp32", init_from)]:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name="lfm2_train", overrides=["stage=pretrain", "distributed=fsdp2",
                                                               f"trainer.precision={precision}"])
        runtime = runtime or Runtime.from_env(cfg.distributed)
        torch.manual_seed(cfg.seed)
        config = read_config(source) if source else get_preset(name)
        model = build_on_meta(config, init_from=source)
        backend = TorchBackend(model, cfg, runtime)
        key = f"{name}-{precision}"
        shards = {n: p.to_local().numel() for n, p in model.named_parameters()}
        report[key] = {"local_numel": sum(shards.values()), "full_numel": model.num_parameters(),
                       "rng_after": torch.get_rng_state()[:16].tolist()}
        state = get_model_state_dict(backend.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        buffers = {f"buffer:{n}": b.detach().cpu().clone() for n, b in model.named_buffers()}
        if runtime.is_main:
            torch.save({**state, **buffers}, out / f"{key}.pt")
        if precision == "bf16":
            seen = []
            head = model.model.layers[0]
            hook = head.register_forward_pre_hook(lambda m, a: seen.append(str(next(m.parameters()).dtype)))
            ids = torch.randint(0, config.vocab_size, (2, 8))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                backend.model(ids).float().sum().backward()
            hook.remove()
            backend.step()
            opt = backend.optimizer.state[next(iter(backend.optimizer.state))]
            report[key].update(compute_dtype=seen[0], master_dtype=str(next(model.parameters()).dtype),
                               optimizer_dtype=str(opt["exp_avg"].dtype),
                               grad_dtype=str(next(model.parameters()).dtype))
    if runtime.is_main:
        (out / "report.json").write_text(json.dumps(report))
''')


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded-init")
    torch.manual_seed(123)
    src = out / "init_from"
    write_checkpoint(LFM2ForCausalLM(get_preset("tiny")).state_dict(), get_preset("tiny"), src)
    script = out / "worker.py"
    script.write_text(_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out), str(src)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"worker failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return out


def _eager(preset: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)  # the config's default seed, as in the worker
    model = LFM2ForCausalLM(get_preset(preset))
    state = {**model.state_dict(), **{f"buffer:{n}": b for n, b in model.named_buffers()}}
    return state, torch.get_rng_state()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_moe"])
def test_meta_init_on_two_ranks_equals_eager_init(launched, preset):
    got = torch.load(launched / f"{preset}-fp32.pt", weights_only=True)
    want, rng_after = _eager(preset)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs from the eager init"
    report = json.loads((launched / "report.json").read_text())[f"{preset}-fp32"]
    assert report["local_numel"] < report["full_numel"]  # really sharded: each rank holds about half
    assert report["rng_after"] == rng_after[:16].tolist()  # and the generator ends where eager leaves it


@pytest.mark.slow
def test_init_from_loads_into_the_sharded_model(launched):
    got = torch.load(launched / "loaded-fp32.pt", weights_only=True)
    want = LFM2ForCausalLM.from_pretrained(launched / "init_from").state_dict()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.slow
def test_bf16_computes_in_bf16_on_fp32_sharded_masters(launched):
    report = json.loads((launched / "report.json").read_text())["tiny-bf16"]
    assert report["compute_dtype"] == "torch.bfloat16"
    assert report["master_dtype"] == report["optimizer_dtype"] == "torch.float32"
