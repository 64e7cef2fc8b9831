"""A stage started by hand without its input says what it needs — and the command that feeds it the tiny
chain's outputs when they are there; a stage without trained weights says so."""

from __future__ import annotations

import pytest

from lfm2_train.hints import CHAIN_INPUTS, chain_command, needs
from lfm2_train.stages import run_stage


def _fake_chain(root):
    work = root / "outputs" / "chain-tiny"
    for d in ("01-shards", "04-teacher/final", "05-teacher_cache/cache", "07-sft/final", "08-pairs", "13-export/model"):
        (work / d).mkdir(parents=True)
    (work / "08-pairs" / "pairs.jsonl").write_text("{}\n")
    return work


def test_without_chain_outputs_the_message_only_says_what_is_needed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert needs("distill", "stage.teacher_cache=<dir>") == "stage=distill needs stage.teacher_cache=<dir>"


def test_with_chain_outputs_the_exact_command_is_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_chain(tmp_path)
    assert chain_command("distill") == ("python -m lfm2_train stage=distill "
                                        "stage.teacher_cache=outputs/chain-tiny/05-teacher_cache/cache "
                                        "data.path=outputs/chain-tiny/01-shards")
    assert chain_command("preference").endswith("model.init_from=outputs/chain-tiny/07-sft/final "
                                                "stage.dataset=outputs/chain-tiny/08-pairs/pairs.jsonl")
    assert set(CHAIN_INPUTS) >= {"distill", "cache_teacher", "midtrain", "preference", "eval", "generate"}


def test_distill_stage_by_hand_points_at_the_chain(tmp_path, monkeypatch, tiny_dataset):
    monkeypatch.chdir(tmp_path)
    _fake_chain(tmp_path)
    from hydra import compose, initialize

    from lfm2_train.config import register_configs

    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=["stage=distill", f"output_dir={tmp_path / 'run'}",
                                                           "logger=disabled", f"data.path={tiny_dataset}"])
    with pytest.raises(ValueError, match="The tiny chain's outputs are here:\n  python -m lfm2_train stage=distill"):
        run_stage(cfg)
