"""The trainer with batches prefetched on a background thread: the same losses as preparing them in the
step, and an interrupted + resumed run equal to the uninterrupted one (the checkpoint holds the state of
the batch trained on, not of the batches already waiting)."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.stages import run_stage

BASE = ["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.max_steps=6",
        "trainer.micro_batch_size=2", "trainer.grad_accum=2", "data.seq_len=32", "trainer.eval_every=0",
        "trainer.checkpoint_every=0", "data.verify_hashes=false"]


def _run(out: Path, data: Path, *overrides: str) -> dict:
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=[*BASE, f"output_dir={out}", f"data.path={data}",
                                                           *overrides])
    return run_stage(cfg)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_prefetched_interrupted_and_resumed_equals_in_step_uninterrupted(tmp_path, tiny_dataset):
    _run(tmp_path / "sync", tiny_dataset, "trainer.prefetch=0")
    part = _run(tmp_path / "ahead", tiny_dataset, "trainer.prefetch=3", "trainer.stop_after_steps=3")
    assert part["status"] == "interrupted"
    state = json.loads((tmp_path / "ahead" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["data"]["rows"] == 3 * 2 * 2  # 3 steps x 2 micro-batches x 2 rows: nothing of the queue
    resumed = _run(tmp_path / "ahead", tiny_dataset, "trainer.prefetch=3")
    assert resumed["status"] == "finished" and resumed["start_step"] == 3
    assert _losses(tmp_path / "ahead") == _losses(tmp_path / "sync")
