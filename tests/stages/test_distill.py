"""Distill stage end to end on tiny configs: cache a teacher, distil, refuse mismatched caches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.data.format import DataFormatError
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.tokenizer import LFM2Tokenizer

COMMON = ["logger=disabled", "trainer.progress_bar=false", "data.seq_len=32", "trainer.micro_batch_size=4",
          "trainer.checkpoint_every=0"]


def _cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[f"output_dir={out}", *COMMON, *overrides])


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("kd")
    torch.manual_seed(0)
    teacher = root / "teacher"
    LFM2ForCausalLM(get_preset("tiny").replace(initializer_range=0.2)).save_pretrained(teacher)
    LFM2Tokenizer.from_pretrained(tiny_dataset / "tokenizer").save_pretrained(teacher)
    run_stage(_cfg(root / "c", "stage=cache_teacher", f"stage.teacher={teacher}", "stage.k=8",
                   f"data.path={tiny_dataset}", "stage.progress_bar=false"))
    return root / "c" / "teacher_cache"


def test_distill_logs_kd_terms_and_validates_on_ce(tmp_path, tiny_dataset, cache):
    summary = run_stage(_cfg(tmp_path, "stage=distill", f"stage.teacher_cache={cache}", "stage.k=8",
                             f"data.path={tiny_dataset}", "trainer.max_steps=3", "trainer.eval_every=3",
                             "stage.kd.kd_weight=0.5", "stage.kd.kd_weight_end=1.0"))
    assert summary["status"] == "finished" and summary["val_loss"] is not None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    for r in train:
        assert {"ce", "kd", "mass", "cond", "p_t", "q_t"} <= set(r)
        assert 0 < r["p_t"] <= 1 and 0 < r["q_t"] <= 1 and r["kd"] >= 0
    # lambda anneals 0.5 -> 1.0: loss = ce + lambda * kd
    assert train[0]["loss"] == pytest.approx(train[0]["ce"] + 0.5 * train[0]["kd"], rel=1e-6)
    assert train[-1]["loss"] == pytest.approx(train[-1]["ce"] + 1.0 * train[-1]["kd"], rel=1e-6)
    manifest = json.loads((Path(summary["final"]) / "lfm2_train_manifest.json").read_text())
    assert manifest["inputs"]["k"] == 8 and manifest["inputs"]["teacher_cache"] == str(cache)


def test_mismatched_cache_is_refused_before_any_step(tmp_path, tiny_dataset, make_dataset, make_texts, cache):
    with pytest.raises(DataFormatError, match="K=8, the run is configured for K=32"):
        run_stage(_cfg(tmp_path / "a", "stage=distill", f"stage.teacher_cache={cache}", f"data.path={tiny_dataset}"))
    other = make_dataset(tmp_path / "other", make_texts(60, seed=5))
    with pytest.raises(DataFormatError, match="other shards"):
        run_stage(_cfg(tmp_path / "b", "stage=distill", f"stage.teacher_cache={cache}", "stage.k=8",
                       f"data.path={other}"))
    with pytest.raises(ValueError, match="stage.teacher_cache"):
        run_stage(_cfg(tmp_path / "c", "stage=distill", f"data.path={tiny_dataset}"))
    assert not (tmp_path / "a" / "checkpoints").exists()
