"""What several stages share: building the model from the `model` config group."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..model import LFM2Config, LFM2ForCausalLM, get_preset
from ..model.hf_io import read_config


def model_config(model_cfg: DictConfig) -> LFM2Config:
    """The preset with `model.overrides` applied (validated: unknown or bad fields are named)."""
    base = get_preset(model_cfg.preset).to_dict()
    overrides = OmegaConf.to_container(model_cfg.overrides, resolve=True) or {}
    base.update(overrides)
    base["attn_implementation"] = model_cfg.attn_implementation
    return LFM2Config.from_dict(base, source="model.overrides")


def build_model(model_cfg: DictConfig, meta: bool = False) -> LFM2ForCausalLM:
    """`model.init_from` (an HF LFM2 directory) if set, else a randomly initialised preset.

    `meta=True` (see `engine.distributed.builds_on_meta`): shapes only; the training backend shards the model
    and then loads or initialises it shard by shard, with the same values as the eager build."""
    if model_cfg.init_from and model_cfg.overrides:
        raise ValueError("model.overrides cannot change the architecture of model.init_from; remove them")
    if meta:
        from ..engine.meta_init import build_on_meta

        if not model_cfg.init_from:
            return build_on_meta(model_config(model_cfg))
        config = read_config(model_cfg.init_from)
        if model_cfg.attn_implementation is not None:
            config = config.replace(attn_implementation=model_cfg.attn_implementation)
        return build_on_meta(config, init_from=model_cfg.init_from)
    if model_cfg.init_from:
        return LFM2ForCausalLM.from_pretrained(model_cfg.init_from, attn_implementation=model_cfg.attn_implementation)
    return LFM2ForCausalLM(model_config(model_cfg))


def resolve_dataset(data_cfg: DictConfig, runtime: Any = None) -> tuple[Path, Path]:
    """(dataset dir, tokenizer dir) for a stage. `data.path=None` prepares the bundled corpus once
    (cached under ~/.cache/lfm2_train, keyed by the job config) so the quick start needs no download."""
    if data_cfg.path is None:
        from data_pipelines.bundled import prepare_bundled_dataset

        return prepare_bundled_dataset(runtime)
    path = Path(data_cfg.path)
    if not path.is_dir():
        raise FileNotFoundError(f"data.path={path} does not exist")
    if data_cfg.tokenizer:
        tok = Path(data_cfg.tokenizer)
    elif (path / "tokenizer" / "tokenizer.json").is_file():
        tok = path / "tokenizer"
    else:
        raise FileNotFoundError(f"data.path={path} has no tokenizer/ directory; set data.tokenizer=<dir>")
    return path, tok
