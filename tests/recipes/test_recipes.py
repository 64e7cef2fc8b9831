"""Every packaged recipe composes against the structured configs (a misspelled key fails), the real-size
recipes carry the LFM2 report's hyper-parameters, every invented value is commented, and the fine-tune chain
in recipes/ is a valid chain whose steps compose."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import yaml
from hydra import compose
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from lfm2_train.config import register_configs
from lfm2_train.config.paths import RECIPE_DIR, initialize_conf, recipe_names

REPO = Path(__file__).resolve().parents[2]
RECIPES = recipe_names()
SIZES = ("lfm2-350m", "lfm2-700m", "lfm2-1.2b", "lfm2-2.6b", "lfm2-8b-a1b")
STAGES = ("pretrain", "midtrain", "cache_teacher", "distill", "sft", "preference", "merge", "eval")
# Values a user must give (`???` in the YAML); anything else missing is a recipe bug.
USER_INPUTS = {"data.path", "model.init_from", "stage.teacher", "stage.output", "stage.teacher_cache",
               "stage.dataset", "stage.base_model", "stage.models"}


@cache
def _compose(*overrides: str):
    """Composed once per override list (a composition costs ~0.5 s; several tests read the same recipe)."""
    register_configs()
    with initialize_conf():
        return compose(config_name="lfm2_train", overrides=["output_dir=/tmp/unused", *overrides])


def _picks(name: str) -> dict[str, str]:
    data = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text()) or {}
    out = {}
    for entry in data.get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                out[key.removeprefix("override").strip().strip("/")] = str(value)
    return out


def _require_stage(stage: str | None) -> None:
    register_configs()
    if stage is not None and f"{stage}.yaml" not in ConfigStore.instance().repo.get("stage", {}):
        pytest.skip(f"stage {stage!r} is not registered yet (its issue has not landed)")


def test_every_size_has_every_stage():
    for size in SIZES:
        assert {f"{size}/{stage}" for stage in STAGES} <= set(RECIPES), size
    assert {"finetune_lfm2/sft", "finetune_lfm2/preference", "finetune_lfm2/merge"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_against_the_schema(name):
    picks = _picks(name)
    stage = picks.get("stage")
    _require_stage(stage)
    cfg = _compose(f"recipe={name}")
    if stage:
        assert cfg.stage.name == stage
    size = name.split("/")[0]
    if size in SIZES and "model" in picks:
        assert cfg.model.preset == size
    missing = set(OmegaConf.missing_keys(cfg))
    assert missing <= USER_INPUTS, f"recipe={name}: unexpected required keys {sorted(missing - USER_INPUTS)}"


def test_every_yaml_in_recipes_is_a_recipe_or_a_chain(monkeypatch):
    """Chains share recipes/ with the recipes; the recipe list (typo hints, the reference, stage=plan) leaves
    them out, and `recipe=<a chain>` is refused as an unknown recipe."""
    from lfm2_train.chain.spec import load_chain
    from lfm2_train.config.validate import ConfigError, check_recipe_argument

    for var in ("LFM2_CHECKPOINT", "LFM2_SFT_DATA", "LFM2_PAIRS", "LFM2_VAL_SHARDS"):
        monkeypatch.setenv(var, f"/inputs/{var.lower()}")
    chains = []
    for path in sorted(RECIPE_DIR.rglob("*.yaml")):
        name = path.relative_to(RECIPE_DIR).with_suffix("").as_posix()
        if name not in RECIPES:
            assert load_chain(str(path)).steps, name  # neither a recipe nor a valid chain: raises
            chains.append(name)
    assert {"chains/tiny", "finetune_lfm2/finetune_lfm2", "finetune_lfm2/finetune_lfm2_lora"} <= set(chains)
    assert load_chain("tiny").steps
    with pytest.raises(ConfigError, match=r"unknown recipe='chains/tiny'"):
        check_recipe_argument(["recipe=chains/tiny"])


def test_command_line_overrides_win_over_a_recipe():
    _require_stage("sft")
    cfg = _compose("recipe=lfm2-1.2b/sft", "optim.lr=1e-5", "model.init_from=/ckpt", "distributed=zero3")
    assert cfg.optim.lr == 1e-5 and cfg.model.init_from == "/ckpt" and cfg.distributed.zero_stage == 3
    assert cfg.optim.min_lr == 1e-7 and cfg.data.seq_len == 32768


def test_a_misspelled_key_in_a_recipe_is_named(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "typo.yaml").write_text("# @package _global_\ntrainer:\n  max_stepz: 10\n")
    with pytest.raises(ConfigCompositionException) as err:
        _compose(f"hydra.searchpath=[file://{tmp_path}]", "recipe=typo")
    assert "max_stepz" in str(err.value.__cause__ or err.value)


def _value_lines(name: str) -> list[str]:
    """`key: value` lines of a recipe (mapping headers and list items excluded)."""
    lines = []
    for line in (RECIPE_DIR / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#") or line.strip().startswith("- ") or not line.strip():
            continue
        if re.match(r"^\s+[A-Za-z_]+: \S", line):
            lines.append(line)
    return lines


@pytest.mark.parametrize("name", [r for r in RECIPES if r.split("/")[0] in (*SIZES, "finetune_lfm2")])
def test_every_value_of_a_real_size_recipe_says_where_it_comes_from(name):
    for line in _value_lines(name):
        assert " # " in line, f"recipe={name}: no comment on {line.strip()!r} ([paper] or [choice] + why)"
    head = (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()
    assert head[0] == "# @package _global_" and f"recipe={name}" in "\n".join(head[:8]), "usage line missing"


def _stage_cfg(size: str, stage: str):
    _require_stage("midtrain" if stage == "midtrain" else stage)
    return _compose(f"recipe={size}/{stage}")


@pytest.mark.parametrize("size", SIZES)
def test_report_hyper_parameters(size):
    pt = _stage_cfg(size, "pretrain")
    assert pt.data.seq_len == 4096 and pt.trainer.precision == "bf16"
    assert pt.trainer.micro_batch_size * 64 * pt.trainer.grad_accum == 1024  # 4.19M tokens per step on 64 GPUs
    assert pt.trainer.max_steps * 1024 * 4096 == pytest.approx(10e12, rel=1e-6)
    mt = _stage_cfg(size, "midtrain")
    assert mt.data.seq_len == 32768 and mt.optim.schedule == "decay" and mt.optim.lr == pt.optim.lr
    assert mt.trainer.max_steps * mt.trainer.micro_batch_size * 64 * mt.trainer.grad_accum * 32768 == pytest.approx(
        1e12, rel=1e-5)
    assert _stage_cfg(size, "cache_teacher").stage.k == 32
    kd = _stage_cfg(size, "distill")
    assert kd.stage.k == 32 and kd.stage.kd.method == "decoupled" and kd.stage.kd.weight == "teacher_mass"
    sft = _stage_cfg(size, "sft")
    assert (sft.stage.epochs, sft.data.seq_len, sft.optim.weight_decay) == (3, 32768, 0.1)
    assert list(sft.optim.betas) == [0.9, 0.95]
    assert (sft.optim.schedule, sft.optim.lr, sft.optim.min_lr, sft.optim.grad_clip) == ("cosine", 3e-5, 1e-7, 1.0)
    assert sft.optim.warmup_steps > 0 and sft.stage.embedding_dropout > 0
    pref = _stage_cfg(size, "preference")
    assert (pref.stage.beta, pref.optim.lr, pref.optim.min_lr, pref.stage.epochs) == (5.0, 8e-7, 8e-8, 2)
    assert [t.name for t in pref.stage.losses] == ["ln_dpo"]


@pytest.mark.parametrize("name", [f"{s}/merge" for s in SIZES] + ["finetune_lfm2/merge"])
def test_merge_candidates_are_valid_merge_configurations(name):
    _require_stage("merge")
    from lfm2_train.merge.config import parse_merge_config
    from lfm2_train.merge.selection import expand_candidates

    stage = OmegaConf.to_container(_compose(f"recipe={name}").stage, resolve=False)
    base = {k: stage[k] for k in ("merge_method", "parameters", "dtype") if stage.get(k) is not None}
    base.update(base_model="/ckpt/sft", models=["/ckpt/pref_a", "/ckpt/pref_b"])
    candidates = expand_candidates(base, stage["candidates"], stage["grid"])
    assert len(candidates) >= 3 and stage["evaluation"] != "none"
    for candidate in candidates:
        parse_merge_config(candidate.config, seed=0)  # raises MergeConfigError naming the problem


@pytest.mark.parametrize("size", SIZES)
def test_eval_tasks_parse(size):
    _require_stage("eval")
    from lfm2_train.evaluation.tasks import parse_task

    tasks = OmegaConf.to_container(_compose(f"recipe={size}/eval").stage.tasks)
    assert [parse_task(t, i).kind for i, t in enumerate(tasks)] == ["perplexity", "lm_eval"]


def test_finetune_chain_is_valid_and_every_step_composes(monkeypatch, tmp_path):
    spec_module = pytest.importorskip("lfm2_train.chain.spec", reason="the chain runner is missing")
    for var in ("LFM2_CHECKPOINT", "LFM2_SFT_DATA", "LFM2_PAIRS", "LFM2_VAL_SHARDS"):
        monkeypatch.setenv(var, f"/inputs/{var.lower()}")
    spec = spec_module.load_chain(str(REPO / "recipes" / "finetune_lfm2" / "finetune_lfm2.yaml"))
    assert [s.name for s in spec.steps] == ["sft", "pref_a", "pref_b", "merged", "export"]
    dirs = {s.name: tmp_path / s.name for s in spec.steps}
    for step in spec.steps:
        if step.stage is None:
            continue
        _require_stage(step.stage)
        cfg = _compose(f"stage={step.stage}", *spec.common, *spec_module.substitute(step.overrides, dirs))
        assert cfg.stage.name == step.stage and not OmegaConf.missing_keys(cfg), step.name
    merged = _compose("stage=merge", *spec_module.substitute(spec.step("merged").overrides, dirs))
    assert list(merged.stage.models) == [f"{tmp_path}/pref_a/final", f"{tmp_path}/pref_b/final"]
    assert _compose("stage=sft", *spec_module.substitute(spec.step("sft").overrides, dirs)).model.init_from == (
        "/inputs/lfm2_checkpoint")
