"""SIGKILL at random moments (fixed seed), then the same command again until it finishes: the result must be
the uninterrupted run's — same losses, same final weights, each metric row once, no temporary directory left.

Kills land anywhere: in imports, in a data job, mid-step, mid-checkpoint, mid-export, in the chain's own
bookkeeping. Each launch is a real `python -m lfm2_train` process, so these tests are slow.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KILLS = 4
PRETRAIN = ["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.max_steps=12",
            "trainer.micro_batch_size=4", "data.seq_len=32", "trainer.eval_every=4", "trainer.checkpoint_every=2",
            "trainer.log_every=1", "optim.warmup_steps=2"]
CHAIN = """
description: kill-anywhere chain
eval_levels: [0, 1]
common: [trainer.checkpoint_every=2, trainer.eval_batches=2, trainer.log_every=1, data.verify_hashes=false]
steps:
  - {name: tokenizer, job: train_tokenizer, args: {vocab_size: 512, max_documents: 800}}
  - {name: shards, job: tokenize, args: {tokenizer: "{tokenizer}", shard_tokens: 8192, total_tokens: 20000}}
  - name: teacher
    stage: pretrain
    overrides: ["data.path={shards}", trainer.max_steps=8, trainer.micro_batch_size=4, data.seq_len=64]
  - name: sft
    stage: sft
    overrides: ["model.init_from={teacher}/final", stage.bundled_rows=60, "stage.bundled_levels=[0,1]",
                stage.epochs=null, trainer.max_steps=6, data.seq_len=64, trainer.micro_batch_size=8]
    evaluate: true
  - {name: export, job: export, args: {model: "{sft}/final"}}
"""


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "LFM2_TRAIN_CACHE": str(tmp / "cache"), "HF_DATASETS_CACHE": str(tmp / "hf")}


def _launch(cmd: list[str], env: dict[str, str], kill_after: float | None) -> int | None:
    """Run to the end (returns the exit code) or SIGKILL after `kill_after` seconds (returns None)."""
    proc = subprocess.Popen([sys.executable, "-m", "lfm2_train", *cmd], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        proc.communicate(timeout=kill_after if kill_after is not None else 600)
        return proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no child may survive to finish the work
        proc.communicate()
        return None


def _kill_then_finish(cmd: list[str], env: dict[str, str], duration: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    moments = [round(rng.uniform(0.3, duration), 2) for _ in range(KILLS)]
    for moment in moments:
        code = _launch(cmd, env, moment)
        assert code in (None, 0), f"a run killed earlier failed on restart (exit {code})"
    assert _launch(cmd, env, None) == 0
    return moments


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    code = _launch(cmd, env, None)
    assert code == 0
    return time.perf_counter() - start


def _metric_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_pretrain_killed_anywhere_finishes_as_if_never_killed(tmp_path, tiny_dataset):
    env = _env(tmp_path)
    common = [*PRETRAIN, f"data.path={tiny_dataset}"]
    duration = _timed([*common, f"output_dir={tmp_path / 'ref'}"], env)
    moments = _kill_then_finish([*common, f"output_dir={tmp_path / 'run'}"], env, duration, seed=0)
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref_rows = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    run_rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tok/s"} for r in rows]  # noqa: E731
    assert strip(run_rows) == strip(ref_rows), f"kills at {moments} s"
    assert _metric_steps(run) == list(range(1, 13))
    assert _sha(run / "final" / "model.safetensors") == _sha(ref / "final" / "model.safetensors")
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    assert not _leftovers(run)


@pytest.mark.slow
def test_chain_killed_anywhere_gives_the_uninterrupted_table_and_weights(tmp_path):
    env = _env(tmp_path)
    chain = tmp_path / "chain.yaml"
    chain.write_text(CHAIN)

    def cmd(workdir: Path) -> list[str]:
        return ["stage=chain", f"stage.chain={chain}", f"stage.workdir={workdir}", "logger=disabled",
                "trainer.progress_bar=false", "stage.eval_problems=8", f"hydra.run.dir={workdir}/hydra"]

    duration = _timed(cmd(tmp_path / "ref"), env)
    moments = _kill_then_finish(cmd(tmp_path / "run"), env, duration, seed=1)

    def table(workdir: Path) -> list[tuple]:
        rows = json.loads((workdir / "chain_summary.json").read_text())["steps"]
        return [(r["step"], r["steps"], r["loss"], r["val_loss"], r["task_acc"]) for r in rows]

    assert table(tmp_path / "run") == table(tmp_path / "ref"), f"kills at {moments} s"
    model = Path("04-export") / "model" / "model.safetensors"
    assert _sha(tmp_path / "run" / model) == _sha(tmp_path / "ref" / model)
    for stage_dir in ("02-teacher", "03-sft"):
        steps = _metric_steps(tmp_path / "run" / stage_dir)
        assert steps == sorted(set(steps)) and steps == _metric_steps(tmp_path / "ref" / stage_dir)
    assert not _leftovers(tmp_path / "run")
