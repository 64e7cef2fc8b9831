"""The Hydra config tree: groups, recipes, typo errors, resolved-config printing, multirun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose
from hydra.errors import ConfigCompositionException

from lfm2_train.config import register_configs
from lfm2_train.config.paths import initialize_conf

REPO = Path(__file__).resolve().parents[2]


def _compose(*overrides: str):
    register_configs()
    with initialize_conf():
        return compose(config_name="lfm2_train", overrides=["output_dir=/tmp/x", *overrides])


def test_groups_have_typed_defaults():
    cfg = _compose("stage=pretrain", "model=lfm2-350m", "distributed=zero3", "logger=disabled")
    assert cfg.model.preset == "lfm2-350m"
    assert cfg.distributed.backend == "deepspeed" and cfg.distributed.zero_stage == 3
    assert cfg.logger.wandb is False and cfg.optim.schedule == "cosine"


@pytest.mark.parametrize("bad", ["optim.lrr=1", "trainer.max_stepz=3", "data.seqlen=5", "model.presett=x"])
def test_misspelled_keys_are_named(bad):
    with pytest.raises(ConfigCompositionException) as err:
        _compose("stage=pretrain", bad)
    assert bad.split("=")[0].split(".")[-1] in str(err.value.__cause__ or err.value)


def test_recipes_select_and_still_override():
    cfg = _compose("stage=pretrain", "recipe=midtrain", "model.init_from=/some/run/final", "data.seq_len=2048")
    assert cfg.optim.schedule == "decay" and cfg.data.seq_len == 2048 and cfg.model.init_from == "/some/run/final"
    assert _compose("recipe=midtrain").stage.name == "midtrain"
    moe = _compose("stage=pretrain", "recipe=tiny_moe")
    assert moe.model.preset == "tiny-moe" and moe.model.overrides.expert_bias_update == "sign"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "lfm2_train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_print_resolved_config(tmp_path):
    proc = _run("stage=pretrain", "recipe=tiny_moe", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preset: tiny-moe" in proc.stdout and "schedule: cosine" in proc.stdout


def test_multirun_sweep(tmp_path, tiny_dataset):
    proc = _run("-m", "stage=pretrain", f"data.path={tiny_dataset}", "optim.lr=1e-3,3e-3", "trainer.max_steps=2",
                "trainer.micro_batch_size=2", "data.seq_len=16", "trainer.eval_every=0", "logger=disabled",
                "trainer.progress_bar=false", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finals = sorted((tmp_path / "sweep").glob("*/final/config.json"))
    assert len(finals) == 2
