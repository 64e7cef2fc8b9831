"""Checks on a composed config that Hydra does not make, run before any data work.

- Keys the schema does not know are refused, including those added with `+key=value` (Hydra opens the
  struct flag for `+`, so `+optim.lrr=1` would otherwise be accepted and ignored).
- Numbers outside their meaningful range (a negative learning rate, zero steps, a temperature of 0) are
  refused naming the key, instead of failing later inside torch or after minutes of data preparation.
- Values a recipe marks `???` must be set: OmegaConf keeps an existing value when merging `???` over it,
  so without this check a required `data.path` would silently stay at its default.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from .paths import recipe_names, recipe_path
from .schema import (
    DataConfig,
    DistributedConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    PlanConfig,
    TrainerConfig,
)


class ConfigError(ValueError):
    """A config value a person must change; the message names the key (and the file when there is one)."""


_GROUPS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "trainer": TrainerConfig,
           "distributed": DistributedConfig, "logger": LoggerConfig, "plan": PlanConfig}
_OPEN_STAGES = {"plan"}  # stage=plan takes the planned recipe's stage keys, whatever stage that is
_ROOT_KEYS = {"stage", *_GROUPS, "seed", "threads", "output_dir", "defaults"}

_NUMBER = (int, float)
Rule = tuple[str, Callable[[Any], bool], str]


def _positive(v: Any) -> bool:
    return isinstance(v, _NUMBER) and math.isfinite(v) and v > 0


def _non_negative(v: Any) -> bool:
    return isinstance(v, _NUMBER) and math.isfinite(v) and v >= 0


def _at_least_one(v: Any) -> bool:
    return isinstance(v, int) and v >= 1


def _fraction(v: Any) -> bool:  # [0, 1)
    return isinstance(v, _NUMBER) and 0 <= v < 1


def _probability(v: Any) -> bool:  # (0, 1]
    return isinstance(v, _NUMBER) and 0 < v <= 1


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _betas(v: Any) -> bool:
    return isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(_fraction(b) for b in v)


# (dotted key, check, what a valid value is). A key absent from the config (another stage's) is skipped.
RULES: list[Rule] = [
    ("optim.lr", _positive, "a learning rate > 0"),
    ("optim.min_lr", _non_negative, ">= 0"),
    ("optim.betas", _betas, "two numbers in [0, 1), e.g. [0.9, 0.95]"),
    ("optim.eps", _positive, "> 0"),
    ("optim.weight_decay", _non_negative, ">= 0"),
    ("optim.warmup_steps", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("optim.decay_fraction", _probability, "in (0, 1]"),
    ("optim.grad_clip", _non_negative, ">= 0 (0 = off)"),
    ("trainer.max_steps", _at_least_one, "an integer >= 1"),
    ("trainer.micro_batch_size", _at_least_one, "an integer >= 1"),
    ("trainer.grad_accum", _at_least_one, "an integer >= 1"),
    ("trainer.eval_every", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = never)"),
    ("trainer.eval_batches", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("trainer.checkpoint_every", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = only at the end)"),
    ("trainer.keep_last", _at_least_one, "an integer >= 1"),
    ("trainer.max_nan_skips", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("trainer.log_every", _at_least_one, "an integer >= 1"),
    ("trainer.stop_after_steps", _optional(_at_least_one), "null or an integer >= 1"),
    ("data.seq_len", lambda v: isinstance(v, int) and v >= 2, "an integer >= 2"),
    ("data.val_fraction", _fraction, "in [0, 1)"),
    ("data.val_max_documents", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    ("threads", _optional(_at_least_one), "null or an integer >= 1"),
    # stages
    ("stage.k", _at_least_one, "an integer >= 1"),
    ("stage.kd.temperature", _positive, "> 0"),
    ("stage.kd.temperature_end", _optional(_positive), "null or > 0"),
    ("stage.kd.kd_weight", _non_negative, ">= 0"),
    ("stage.kd.kd_weight_end", _optional(_non_negative), "null or >= 0"),
    ("stage.beta", _positive, "> 0"),
    ("stage.quant", lambda v: v in (None, "int8", "w8a8", "q4_0"), "null, int8, w8a8 or q4_0"),
    ("stage.label_smoothing", lambda v: isinstance(v, _NUMBER) and 0 <= v < 0.5, "in [0, 0.5)"),
    ("stage.epochs", _optional(_positive), "null or > 0"),
    ("stage.embedding_dropout", _fraction, "in [0, 1)"),
    ("stage.mix_pretrain", _fraction, "in [0, 1)"),
    ("stage.bundled_rows", _at_least_one, "an integer >= 1"),
    ("stage.max_new_tokens", _at_least_one, "an integer >= 1"),
    ("stage.temperature", _non_negative, ">= 0 (0 = greedy)"),
    ("stage.top_k", lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 = off)"),
    ("stage.top_p", _probability, "in (0, 1]"),
    ("stage.min_p", _fraction, "in [0, 1)"),
    ("stage.repetition_penalty", _positive, "> 0"),
    ("stage.max_length", _at_least_one, "an integer >= 1"),
    ("stage.max_tokens_per_batch", _at_least_one, "an integer >= 1"),
    ("stage.block_documents", _at_least_one, "an integer >= 1"),
    ("stage.ref_batch_pairs", _at_least_one, "an integer >= 1"),
    ("stage.batch_size", _at_least_one, "an integer >= 1"),
    ("stage.eval_batch_size", _at_least_one, "an integer >= 1"),
    ("stage.eval_problems", _at_least_one, "an integer >= 1"),
    ("stage.param_budget", _at_least_one, "an integer >= 1"),
    ("stage.repeats", _at_least_one, "an integer >= 1"),
    ("stage.train_steps", _at_least_one, "an integer >= 1"),
]
_UNSET = object()


def _stage_schema(name: str) -> DictConfig | None:
    from hydra.core.config_store import ConfigStore

    try:
        return ConfigStore.instance().load(f"stage/{name}.yaml").node
    except Exception:  # an unregistered stage is reported by run_stage, with the list of stages
        return None


def _closest(key: str, known: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, known, n=1)
    if match:
        return f"; did you mean {prefix + match[0]!r}?"
    return f"; known keys under {prefix[:-1] or 'the root'}: {', '.join(sorted(known))}"


def _open_free_form(node: DictConfig) -> None:
    """Struct on dataclass nodes only: fields typed `dict` (model.overrides, deepspeed_config, grid…) take
    any key."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if child._metadata.object_type in (None, dict):
                OmegaConf.set_struct(child, False)
            else:
                _open_free_form(child)


def check_known_keys(cfg: DictConfig) -> None:
    """Merge each group into a fresh copy of its schema: a key the schema lacks raises, naming its path."""
    unknown = sorted(set(cfg.keys()) - _ROOT_KEYS)
    if unknown:
        raise ConfigError(f"unknown top-level key {unknown[0]!r}{_closest(unknown[0], sorted(_ROOT_KEYS))}")
    schemas: dict[str, Any] = {group: OmegaConf.structured(cls) for group, cls in _GROUPS.items()}
    stage = cfg.get("stage")
    if isinstance(stage, DictConfig) and stage.get("name") is not None and stage.name not in _OPEN_STAGES:
        node = _stage_schema(str(stage.name))
        if node is not None:
            schemas["stage"] = node
    for group, schema in schemas.items():
        if group not in cfg or not isinstance(cfg[group], DictConfig):
            continue
        fresh = schema.copy()
        OmegaConf.set_struct(fresh, True)
        _open_free_form(fresh)
        try:
            OmegaConf.merge(fresh, OmegaConf.to_container(cfg[group], resolve=False))
        except ConfigKeyError as err:
            key = str(err.key) if getattr(err, "key", None) is not None else str(err)
            parent = err.full_key.rsplit(".", 1)[0] if err.full_key and "." in err.full_key else ""
            full = f"{group}.{parent + '.' if parent else ''}{key}"
            known_node = OmegaConf.select(fresh, parent) if parent else fresh
            known = list(known_node.keys()) if isinstance(known_node, DictConfig) else []
            raise ConfigError(f"unknown key {full!r}{_closest(key, known, full[: -len(key)])}") from None


def check_values(cfg: DictConfig, rules: list[Rule] = RULES) -> None:
    for key, check, want in rules:
        value = OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False)
        if value is _UNSET or value == "???":
            continue
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value)
        if not check(value):
            raise ConfigError(f"{key}={value!r} is not valid: expected {want}")


def recipe_file(choice: str | None) -> Path | None:
    return recipe_path(choice) if choice else None


def required_keys(recipe: Path) -> list[str]:
    """Dotted keys a recipe file marks `???` (values the person running it must give)."""
    data = yaml.safe_load(recipe.read_text()) or {}
    data.pop("defaults", None)
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif node == "???":
            found.append(prefix[:-1])

    walk(data, "")
    return found


def check_recipe_required(cfg: DictConfig, choice: str | None) -> None:
    recipe = recipe_file(choice)
    if recipe is None:
        return
    for key in required_keys(recipe):
        if OmegaConf.select(cfg, key, default=None, throw_on_missing=False) in (None, "???"):
            raise ConfigError(f"Missing mandatory value: {key} (required by recipe={choice}, {recipe}); "
                              f"add {key}=<value> to the command")


def validate(cfg: DictConfig, recipe_choice: str | None = None) -> None:
    """Every check above; raises `ConfigError` naming the first problem."""
    check_known_keys(cfg)
    if OmegaConf.select(cfg, "stage.name") not in _OPEN_STAGES:  # a plan needs the recipe's shapes, not its inputs
        check_recipe_required(cfg, recipe_choice)
    check_values(cfg)


_FILE_SEARCH_PATH = re.compile(r"file://([^,\]\s'\"]+)")


def available_recipes() -> list[str]:
    """Every `recipe=` choice, per-size ones included (`lfm2-350m/pretrain`); chains are not recipes."""
    return recipe_names()


def user_recipes(argv: list[str]) -> list[str]:
    """Recipes in the config directories a command adds (`--config-dir D`, `-cd D`,
    `hydra.searchpath=[file://D]`): every YAML file in `D/recipe/` is a choice, as Hydra sees it."""
    dirs: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            dirs.append(arg.partition("=")[2])
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            dirs += _FILE_SEARCH_PATH.findall(arg)
    roots = [Path(d) / "recipe" for d in dirs]
    return [p.relative_to(r).with_suffix("").as_posix() for r in roots if r.is_dir() for p in r.rglob("*.yaml")]


def check_recipe_argument(argv: list[str]) -> None:
    """Refuse an unknown `recipe=` before Hydra does: Hydra lists only the top-level recipes."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key != "recipe" or not value or value == "null":
            continue
        known = sorted({*available_recipes(), *user_recipes(argv)})
        if value not in known:
            match = difflib.get_close_matches(value, known, n=1)
            hint = f"did you mean {match[0]!r}? " if match else ""
            raise ConfigError(f"unknown recipe={value!r}; {hint}recipes: {', '.join(known)}")
