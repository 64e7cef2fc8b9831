"""SFT with pre-training rows replayed in every batch (`stage.mix_pretrain`): the share, the record in the
manifest, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.engine.distributed import Runtime
from lfm2_train.stages import run_stage
from lfm2_train.stages.sft import build_job

BASE = ["stage=sft", "logger=disabled", "trainer.progress_bar=false", "data.seq_len=64", "trainer.micro_batch_size=4",
        "stage.bundled_rows=120", "stage.epochs=null", "trainer.max_steps=6", "trainer.eval_every=3",
        "trainer.checkpoint_every=2", "optim.lr=1e-2", "optim.min_lr=1e-3", "optim.warmup_steps=1",
        "stage.mix_pretrain=0.25"]


def _cfg(out: Path, data: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train",
                       overrides=[*BASE, f"output_dir={out}", f"stage.mix_data={data}", *overrides])


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_one_row_in_four_is_pretraining_text(tmp_path, tiny_dataset):
    job = build_job(_cfg(tmp_path, tiny_dataset), Runtime())
    batch = job.train.next_batch(4)
    labelled = (batch["labels"] != -100).float().mean(dim=1)  # (4,)
    assert labelled[:3].max() < 0.9 and labelled[3] > 0.9  # chat rows label answers only; text rows every token
    assert job.inputs["mix_pretrain"]["fraction"] == 0.25
    assert job.inputs["mix_pretrain"]["dataset"] == str(tiny_dataset)


def test_mixed_sft_resumes_exactly(tmp_path, tiny_dataset):
    full = run_stage(_cfg(tmp_path / "full", tiny_dataset))
    part = run_stage(_cfg(tmp_path / "part", tiny_dataset, "trainer.stop_after_steps=3"))
    assert part["status"] == "interrupted"
    resumed = run_stage(_cfg(tmp_path / "part", tiny_dataset))
    assert resumed["start_step"] == 3 and full["status"] == "finished"
    assert _losses(tmp_path / "part") == _losses(tmp_path / "full")
