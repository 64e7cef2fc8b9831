"""The generate stage through Hydra: config composition, typo errors, checkpoints in and out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException

from lfm2_train.config import register_configs
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.stages import run_stage

REPO = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=["stage=generate", f"output_dir={tmp_path}", *overrides])


def test_generate_random_preset_writes_generations_and_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "stage.max_new_tokens=6", "stage.prompts=[a b,hello there]")
    summary = run_stage(cfg)
    lines = (tmp_path / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == ["a b", "hello there"]
    assert all(len(json.loads(line)["tokens"]) <= 6 for line in lines)
    assert summary["new_tokens"] == sum(len(json.loads(line)["tokens"]) for line in lines)
    ckpt = tmp_path / "checkpoint"
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    assert LFM2ForCausalLM.from_pretrained(ckpt).config.vocab_size == 512


def test_generate_from_checkpoint_is_deterministic(tmp_path: Path) -> None:
    first = tmp_path / "first"
    run_stage(_cfg(first, "stage.max_new_tokens=5", "seed=3"))
    again = tmp_path / "again"
    run_stage(_cfg(again, f"model.init_from={first / 'checkpoint'}", "stage.max_new_tokens=5", "stage.chat=false"))
    a = json.loads((first / "generations.jsonl").read_text())
    b = json.loads((again / "generations.jsonl").read_text())
    assert a["tokens"] == b["tokens"]
    assert not (again / "checkpoint").exists()  # a loaded checkpoint is not copied


def test_chat_sampling_runs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "stage.chat=true", "stage.temperature=0.8", "stage.top_p=0.9", "stage.min_p=0.05",
               "stage.max_new_tokens=4", "stage.save_checkpoint=false")
    assert run_stage(cfg)["new_tokens"] >= 1
    assert not (tmp_path / "checkpoint").exists()


def test_misspelled_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        _cfg(tmp_path, "stage.max_new_tokenz=3")
    assert "max_new_tokenz" in str(err.value.__cause__ or err.value)


def test_bad_dtype_and_missing_tokenizer_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage.dtype"):
        run_stage(_cfg(tmp_path, "stage.dtype=float8"))
    run_stage(_cfg(tmp_path / "a", "stage.max_new_tokens=1"))
    (tmp_path / "a" / "checkpoint" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="stage.tokenizer"):
        run_stage(_cfg(tmp_path / "b", f"model.init_from={tmp_path / 'a' / 'checkpoint'}"))


def test_module_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "lfm2_train", "stage=generate", "stage.max_new_tokens=3", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tok/s" in proc.stdout
    assert (tmp_path / "generations.jsonl").is_file()
