"""stage=plan: recipes compose under it, the stated hardware is read from the recipe, and a plan that
does not fit says so."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lfm2_train.engine.plan_report import markdown_table
from lfm2_train.stages.plan import compose_training_config, plan_config, shipped_recipes, stated_gpus

SETTINGS = {"gpus": None, "gpu_memory_gb": 80.0, "reserved_gb": 5.0, "mfu": 0.4, "peak_tflops": 989.0}


def test_recipe_stage_keys_compose_under_stage_plan():
    cfg = compose_training_config(["stage=plan", "recipe=lfm2-8b-a1b/distill", "plan.gpus=64"])
    assert cfg.stage.name == "plan" and cfg.stage.kd.method == "decoupled" and cfg.plan.gpus == 64
    planned = compose_training_config(["recipe=lfm2-8b-a1b/distill"])
    assert planned.stage.name == "distill" and planned.model.preset == "lfm2-8b-a1b"


def test_stated_gpus_come_from_the_recipe_header():
    assert stated_gpus("lfm2-8b-a1b/pretrain") == 64
    assert stated_gpus("lfm2-350m/preference") == 8
    assert stated_gpus("finetune_lfm2/sft") == 1 and stated_gpus(None) == 1
    assert "lfm2-8b-a1b/pretrain" in shipped_recipes()


def test_plan_reports_memory_flops_and_a_verdict():
    cfg = compose_training_config(["recipe=lfm2-350m/distill", "model=tiny", "data.seq_len=64",
                                   "trainer.micro_batch_size=2", "distributed=fsdp2"])
    plan = plan_config(cfg, OmegaConf.create({**SETTINGS, "gpus": 2}), "lfm2-350m/distill")
    assert plan.stage == "distill" and plan.gpus == 2 and plan.fits
    text = plan.report()
    assert "per-rank peak" in text and "model FLOPs/token" in text and "fits:" in text
    tight = plan_config(cfg, OmegaConf.create({**SETTINGS, "gpus": 2, "gpu_memory_gb": 0.001, "reserved_gb": 0}),
                        "lfm2-350m/distill")
    assert not tight.fits and "DOES NOT FIT" in tight.report()
    table = markdown_table([plan, tight])
    assert table.count("\n") == 3 and "**DOES NOT FIT**" in table


def test_a_stage_that_does_not_train_is_reported_not_planned():
    cfg = compose_training_config(["recipe=lfm2-350m/eval"])
    plan = plan_config(cfg, OmegaConf.create(SETTINGS), "lfm2-350m/eval")
    assert plan.memory is None and "does not train" in plan.report()


@pytest.mark.slow
def test_cli_plans_a_recipe(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lfm2_train", "stage=plan", "recipe=lfm2-350m/sft", "model=tiny", "data.seq_len=128",
         "plan.gpus=4", "plan.gpu_memory_gb=24", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, check=True)
    assert "stage=sft" in out.stdout and "on 4 GPU(s) x 24 GiB" in out.stdout and "fits:" in out.stdout


def test_a_list_of_recipes_gives_a_table(capsys):
    from lfm2_train.stages.plan import run

    cfg = OmegaConf.create({"plan": {**SETTINGS, "all_recipes": False, "recipes": ["lfm2-350m/eval"]}})
    out = run(cfg)
    assert out["plans"] == 1 and "| lfm2-350m/eval | eval |" in out["table"]
    assert "does not train" in capsys.readouterr().out
