"""Config checks Hydra does not make: unknown `+keys`, values out of range, a recipe's `???` inputs, recipe
names — each refused naming the key before any data work."""

from __future__ import annotations

import pytest
from hydra import compose

from lfm2_train.config import register_configs
from lfm2_train.config.paths import initialize_conf
from lfm2_train.config.validate import (
    ConfigError,
    available_recipes,
    check_recipe_argument,
    recipe_file,
    required_keys,
    validate,
)


def _cfg(*overrides: str):
    register_configs()
    with initialize_conf():
        return compose(config_name="lfm2_train", overrides=["output_dir=/tmp/unused", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["stage=pretrain", "+optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["stage=distill", "+stage.kd.temprature=2"], "unknown key 'stage.kd.temprature'; did you mean "
                                                  "'stage.kd.temperature'?"),
    (["stage=pretrain", "+data.pacing.kindd=1"], "did you mean 'data.pacing.kind'?"),
    (["stage=pretrain", "+sead=1"], "unknown top-level key 'sead'; did you mean 'seed'?"),
])
def test_keys_the_schema_does_not_know_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        validate(_cfg(*overrides))


def test_free_form_mappings_still_take_any_key():
    validate(_cfg("stage=pretrain", "++model.overrides={hidden_size: 64}"))
    validate(_cfg("stage=pretrain", "distributed=zero2", "++distributed.deepspeed_config.zero_optimization.x=0"))
    validate(_cfg("stage=merge", "++stage.grid={t: [0.1]}", "+stage.parameters.weight=1"))


@pytest.mark.parametrize("override,message", [
    ("optim.lr=-1e-3", "optim.lr=-0.001 is not valid: expected a learning rate > 0"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is not valid: expected an integer >= 1"),
    ("optim.betas=[0.9,1.5]", r"optim.betas=\[0.9, 1.5\] is not valid"),
    ("data.seq_len=1", "data.seq_len=1 is not valid"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0"),
])
def test_values_out_of_range_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg("stage=pretrain", override))


@pytest.mark.parametrize("stage,override,message", [
    ("distill", "stage.kd.temperature=0", "stage.kd.temperature=0"),
    ("preference", "stage.beta=-1", "stage.beta=-1"),
    ("sft", "stage.mix_pretrain=1.5", "stage.mix_pretrain=1.5"),
    ("generate", "stage.top_p=0", "stage.top_p=0"),
])
def test_stage_values_are_checked_too(stage, override, message):
    with pytest.raises(ConfigError, match=message):
        validate(_cfg(f"stage={stage}", override))


def test_every_packaged_default_is_valid():
    for stage in ("pretrain", "midtrain", "cache_teacher", "distill", "sft", "preference", "merge", "eval",
                  "generate", "search", "chain"):
        validate(_cfg(f"stage={stage}"))


def test_a_recipes_question_marks_are_really_mandatory():
    """OmegaConf keeps the default (null) when `???` is merged over it, so the recipe file is the record."""
    recipe = "lfm2-1.2b/pretrain"
    assert "data.path" in required_keys(recipe_file(recipe))
    with pytest.raises(ConfigError, match=r"Missing mandatory value: data.path \(required by "
                                          r"recipe=lfm2-1.2b/pretrain"):
        validate(_cfg(f"recipe={recipe}"), recipe)
    validate(_cfg(f"recipe={recipe}", "data.path=/data/shards"), recipe)


def test_a_recipe_typo_lists_the_per_size_recipes():
    assert "lfm2-350m/pretrain" in available_recipes() and "sft" in available_recipes()
    with pytest.raises(ConfigError, match=r"unknown recipe='lfm2-350m/pretrian'; did you mean "
                                          r"'lfm2-350m/pretrain'\? recipes: .*lfm2-8b-a1b/distill"):
        check_recipe_argument(["stage=pretrain", "recipe=lfm2-350m/pretrian"])
    check_recipe_argument(["recipe=lfm2-350m/pretrain", "recipe=null"])


def test_a_recipe_in_a_users_config_dir_is_known(tmp_path):
    """recipes/README.md: copy a recipe to `myconf/recipe/` and run it with `--config-dir myconf`."""
    (tmp_path / "recipe" / "team").mkdir(parents=True)
    (tmp_path / "recipe" / "team" / "my_sft.yaml").write_text("# @package _global_\noptim:\n  lr: 1.0e-05\n")
    for extra in (["--config-dir", str(tmp_path)], ["-cd", str(tmp_path)], [f"--config-dir={tmp_path}"],
                  [f"hydra.searchpath=[file://{tmp_path}]"]):
        check_recipe_argument([*extra, "recipe=team/my_sft"])
    with pytest.raises(ConfigError, match=r"unknown recipe='team/my_sft'"):
        check_recipe_argument(["recipe=team/my_sft"])
    with pytest.raises(ConfigError, match=r"did you mean 'team/my_sft'\?"):
        check_recipe_argument(["--config-dir", str(tmp_path), "recipe=team/my_stf"])
