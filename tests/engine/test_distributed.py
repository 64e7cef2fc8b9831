"""Data parallelism on CPU (gloo, 2 processes) computes the same training run as one process.

Each backend is launched for real (`python -m torch.distributed.run --nproc_per_node 2 -m lfm2_train ...`) with
`trainer.micro_batch_size=2`, and compared with one process reading the same global batch
(`trainer.micro_batch_size=4`, run in this process): per-step loss within 1e-5, gradient norm (before
clipping; clipping is active, the norm is ~2 > optim.grad_clip=1) within 1e-5 relative, same LR and token
counts, and the exported final weights within 1e-5. Bit-equality is not expected: the reduction order of
the gradients differs, and fp32 matmuls differ in the last bit from one process launch to the next.

`optim.lr` is small on purpose. Adam's update g / (sqrt(v) + eps) is hypersensitive where |g| ~ eps: a
1e-10 difference in such a gradient moves that weight by ~lr * 1e-2. At lr 3e-3 this reaches 4e-5 after 4
steps between two launches of the *same* configuration; at 3e-4 it stays well under 1e-5. The LR does not
weaken the check of the loss normalisation: the gradient norm is compared, and it is what a wrong scale
(e.g. a division by the accumulation steps done twice) would change — Adam itself is scale invariant.

Each launch costs 20-50 s on 2 cores (importing torch in the launcher and in both workers dominates), so
the launching tests are marked slow. The DeepSpeed ones skip when deepspeed cannot be imported; they need no
compiled op (torch AdamW; the CPU shared-memory comm op is disabled by the backend).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.engine.deepspeed_backend import build_deepspeed_config
from lfm2_train.engine.trainer import Trainer
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.stages import run_stage

REPO = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 300
TOL = 1e-5
COMMON = ["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.max_steps=4", "data.seq_len=32",
          "trainer.eval_every=0", "trainer.checkpoint_every=0", "optim.warmup_steps=1", "optim.lr=3e-4",
          "optim.min_lr=3e-5", "optim.grad_clip=1.0"]
# ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole on every rank; every
# tensor of the tiny model is smaller, so without 0 nothing would be partitioned and nothing gathered.
ZERO3 = ["distributed=zero3", "++distributed.deepspeed_config.zero_optimization.stage3_param_persistence_threshold=0"]
CASES = {  # backend -> (overrides, trainer.grad_accum)
    "fsdp2": (["distributed=fsdp2"], 2),
    "zero2": (["distributed=zero2"], 2),
    "zero3": (ZERO3, 2),
}


# ---------------------------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               WANDB_MODE="disabled", OMP_NUM_THREADS="1", DS_BUILD_OPS="0", HYDRA_FULL_ERROR="1",
               CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")  # CPU + gloo even on a GPU machine
    return env


def _run(cmd: list[str], what: str, expect: int = 0) -> float:
    """Run `cmd` from the repository root; fail with the tail of its output unless it exits with `expect`.
    Returns the wall time."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        output = f"{e.stdout or ''}{e.stderr or ''}"
        pytest.fail(f"{what}: no result after {LAUNCH_TIMEOUT_S}s\n{output[-6000:]}")
    if proc.returncode != expect:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return time.perf_counter() - start


def _launch(out: Path, overrides: list[str], expect: int = 0) -> float:
    """`torchrun --standalone --nproc_per_node 2 -m lfm2_train ...` writing into `out`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lfm2_train", *overrides, f"output_dir={out}", f"hydra.run.dir={out}/hydra"]
    return _run(cmd, "torchrun " + " ".join(overrides), expect)


def _overrides(data: Path, grad_accum: int, micro_batch_size: int, *extra: str) -> list[str]:
    return [*COMMON, f"data.path={data}", f"trainer.grad_accum={grad_accum}",
            f"trainer.micro_batch_size={micro_batch_size}", *extra]


def _cfg(out: Path, overrides: list[str]):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*overrides, f"output_dir={out}"])


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return LFM2ForCausalLM.from_pretrained(out / "final").state_dict()


def _assert_same_run(got: Path, want: Path, what: str) -> None:
    """Same steps, tokens and LR; loss, gradient norm and final weights within TOL. Prints the differences."""
    g, w = _metrics(got), _metrics(want)
    assert sorted(g) == sorted(w), f"{what}: logged steps {sorted(g)} != {sorted(w)}"
    loss_diff = max(abs(g[s]["loss"] - w[s]["loss"]) for s in w)
    norm_diff = max(abs(g[s]["grad_norm"] / w[s]["grad_norm"] - 1) for s in w)
    for s in w:
        assert g[s]["tokens"] == w[s]["tokens"] and g[s]["lr"] == w[s]["lr"], f"{what}: step {s} batch/LR differ"
        assert abs(g[s]["loss"] - w[s]["loss"]) < TOL, f"{what}: step {s} loss {g[s]['loss']} != {w[s]['loss']}"
        assert g[s]["grad_norm"] == pytest.approx(w[s]["grad_norm"], rel=TOL), f"{what}: step {s} grad norm"
    a, b = _final_weights(got), _final_weights(want)
    assert a.keys() == b.keys()
    weight_diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"\n{what}: max |loss diff| {loss_diff:.2e}, max grad-norm rel diff {norm_diff:.2e}, "
          f"max |weight diff| {weight_diff:.2e}")
    assert weight_diff < TOL, f"{what}: final weights differ by {weight_diff:.3e}"


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_dataset):
    """One-process reference runs (micro-batch 4 = 2 ranks x 2), made in this process once per grad_accum."""
    runs: dict[int, Path] = {}

    def get(grad_accum: int) -> Path:
        if grad_accum not in runs:
            out = tmp_path_factory.mktemp(f"single-ga{grad_accum}")
            run_stage(_cfg(out, _overrides(tiny_dataset, grad_accum, 4)))
            runs[grad_accum] = out
        return runs[grad_accum]

    return get


@pytest.fixture(scope="module")
def deepspeed_ok() -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # an incompatible build fails with all kinds of errors, not only ImportError
        pytest.skip(f"deepspeed cannot be imported ({type(e).__name__}: {e})")


# ---------------------------------------------------------------------------------------------- tests
def test_deepspeed_config_is_generated_from_ours(tmp_path):
    """No DeepSpeed JSON: accumulation, clipping, batch and precision come from our config and cannot be
    overridden through distributed.deepspeed_config; other keys merge in."""
    base = [*COMMON, "distributed=zero3", "trainer.micro_batch_size=3", "trainer.grad_accum=4", "optim.grad_clip=0.5"]
    ds = build_deepspeed_config(_cfg(tmp_path, [*base, "++distributed.deepspeed_config.zero_optimization."
                                                       "reduce_bucket_size=1000"]), world_size=2)
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["train_batch_size"] == 6
    assert ds["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert build_deepspeed_config(_cfg(tmp_path, [*base, "trainer.precision=bf16"]), 2)["bf16"]["enabled"] is True
    with pytest.raises(ValueError, match="optim.grad_clip"):
        build_deepspeed_config(_cfg(tmp_path, [*base, "++distributed.deepspeed_config.gradient_clipping=1.0"]), 2)
    with pytest.raises(ValueError, match="distributed.zero_stage"):
        build_deepspeed_config(_cfg(tmp_path, [*base, "++distributed.deepspeed_config.zero_optimization.stage=1"]), 2)
    with pytest.raises(ValueError, match="zero_stage=0"):
        build_deepspeed_config(_cfg(tmp_path, [*base, "distributed.zero_stage=0"]), 2)


@pytest.mark.slow
@pytest.mark.parametrize("backend", sorted(CASES))
def test_two_processes_match_one(backend, tmp_path, tiny_dataset, single, request):
    overrides, grad_accum = CASES[backend]
    if backend.startswith("zero"):
        request.getfixturevalue("deepspeed_ok")
    seconds = _launch(tmp_path, _overrides(tiny_dataset, grad_accum, 2, *overrides))
    print(f"\n{backend}: 2-process launch took {seconds:.1f}s")
    _assert_same_run(tmp_path, single(grad_accum), f"{backend} (grad_accum={grad_accum})")


@pytest.mark.slow
def test_ddp_interrupted_and_resumed_matches_one_process(tmp_path, tiny_dataset, single):
    """DDP parity and exact resume in two launches: stop after step 2 (checkpoint), then resume to step 4."""
    overrides = _overrides(tiny_dataset, 1, 2, "distributed=ddp")
    # Interrupted workers exit with EXIT_INTERRUPTED (75); torchrun reports any worker failure as exit 1.
    _launch(tmp_path, [*overrides, "trainer.stop_after_steps=2"], expect=1)
    first = json.loads((tmp_path / "summary.json").read_text())
    assert first["status"] == "interrupted" and first["steps"] == 2
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    assert (ckpt / "checksums.json").is_file() and (ckpt / "dcp" / ".metadata").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["world_size"] == 2
    _launch(tmp_path, overrides)
    second = json.loads((tmp_path / "summary.json").read_text())
    assert second["status"] == "finished" and second["start_step"] == 2 and second["steps"] == 4
    _assert_same_run(tmp_path, single(1), "ddp stop@2 + resume (grad_accum=1)")


# A worker for what the command line cannot express: a loss that turns NaN on one rank only, and a DeepSpeed
# resume inside one launch. Each run seeds like `run_stage`, so the model starts identical on every rank.
_WORKER = textwrap.dedent('''
    import json, random, sys, warnings
    from pathlib import Path
    import numpy as np, torch
    from hydra import compose, initialize
    from lfm2_train.config import register_configs
    from lfm2_train.engine.distributed import Runtime
    from lfm2_train.engine.trainer import Trainer
    from lfm2_train.engine.job import build_job

    base, jobs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    register_configs()
    runtime = None
    for job_spec in jobs:
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name="lfm2_train", overrides=base + job_spec["overrides"])
        runtime = runtime or Runtime.from_env(cfg.distributed)
        random.seed(cfg.seed); np.random.seed(cfg.seed); torch.manual_seed(cfg.seed)
        job = build_job(cfg, runtime)
        nan_call, inner, calls = job_spec.get("nan_call"), job.loss_fn, {"n": 0}

        def loss_fn(model, batch, inner=inner, calls=calls, nan_call=nan_call):
            calls["n"] += 1
            loss, n = inner(model, batch)
            if model.training and calls["n"] == nan_call and runtime.rank == runtime.world_size - 1:
                loss = loss * float("nan")
            return loss, n

        job.loss_fn = loss_fn
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = Trainer(cfg, job, runtime).fit()
        if runtime.is_main:
            skipped = [str(w.message) for w in caught if "non-finite" in str(w.message)]
            Path(cfg.output_dir, "worker.json").write_text(json.dumps({"summary": summary, "skipped": skipped}))
''')


@pytest.mark.slow
def test_deepspeed_nan_skip_and_resume(tmp_path, tiny_dataset, single, deepspeed_ok):
    """ZeRO-1/2/3 skip a step whose loss is NaN on one rank exactly like one process does (the update is
    discarded through DeepSpeed's own overflow path), and ZeRO-3 resumes exactly from its checkpoint."""
    nan_call = 3  # grad_accum=2: the first micro-step of the second step (step index 1)
    base = _overrides(tiny_dataset, 2, 2)
    jobs = [{"overrides": [f"distributed=zero{z}", f"output_dir={tmp_path / f'nan-zero{z}'}"], "nan_call": nan_call}
            for z in (1, 2, 3)]
    jobs[2]["overrides"] = [*ZERO3, f"output_dir={tmp_path / 'nan-zero3'}"]
    resumed = tmp_path / "resume-zero3"
    jobs += [{"overrides": [*ZERO3, f"output_dir={resumed}", "trainer.stop_after_steps=2"]},
             {"overrides": [*ZERO3, f"output_dir={resumed}"]}]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    seconds = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), json.dumps(base), json.dumps(jobs)], "deepspeed worker")
    print(f"\ndeepspeed worker (5 runs in one launch) took {seconds:.1f}s")

    # The same NaN, one process.
    from lfm2_train.engine.distributed import Runtime
    from lfm2_train.engine.job import build_job

    ref = tmp_path / "nan-single"
    cfg = _cfg(ref, _overrides(tiny_dataset, 2, 4))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    job = build_job(cfg, Runtime())
    inner, calls = job.loss_fn, {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss, n = inner(model, batch)
        return (loss * float("nan"), n) if model.training and calls["n"] == nan_call else (loss, n)

    job.loss_fn = loss_fn
    with pytest.warns(UserWarning, match="step 1: non-finite loss"):
        Trainer(cfg, job).fit()
    assert sorted(_metrics(ref)) == [1, 3, 4]
    for z in (1, 2, 3):
        out = tmp_path / f"nan-zero{z}"
        worker = json.loads((out / "worker.json").read_text())
        assert worker["skipped"] and "step 1: non-finite loss" in worker["skipped"][0]
        _assert_same_run(out, ref, f"zero{z}, NaN on rank 1 in step 2 (grad_accum=2)")
    assert json.loads((resumed / "worker.json").read_text())["summary"]["start_step"] == 2
    assert (resumed / "checkpoints" / "step-00000002" / "deepspeed").is_dir()
    _assert_same_run(resumed, single(2), "zero3 stop@2 + resume (grad_accum=2)")
