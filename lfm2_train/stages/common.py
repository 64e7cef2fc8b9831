"""What several stages share: building the model (and its LoRA adapters) from the `model` config group."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..model import LFM2Config, LFM2ForCausalLM, get_preset
from ..model.hf_io import read_config
from ..model.lora import LoRAConfig, apply_lora, load_lora_state
from ..model.peft_io import load_model, read_adapter_config, read_adapter_state
from ..model.qlora import quantize_base


def model_config(model_cfg: DictConfig) -> LFM2Config:
    """The preset with `model.overrides` applied (validated: unknown or bad fields are named)."""
    base = get_preset(model_cfg.preset).to_dict()
    overrides = OmegaConf.to_container(model_cfg.overrides, resolve=True) or {}
    base.update(overrides)
    base["attn_implementation"] = model_cfg.attn_implementation
    return LFM2Config.from_dict(base, source="model.overrides")


def build_model(model_cfg: DictConfig, meta: bool = False) -> LFM2ForCausalLM:
    """`model.init_from` if set — an HF LFM2 directory, or a PEFT adapter directory folded into the base it
    names — else a randomly initialised preset.

    `meta=True` (see `engine.distributed.builds_on_meta`): shapes only; the training backend shards the model
    and then loads or initialises it shard by shard, with the same values as the eager build. An adapter
    directory is folded into its base eagerly (the fold needs the base's values)."""
    if model_cfg.init_from and model_cfg.overrides:
        raise ValueError("model.overrides cannot change the architecture of model.init_from; remove them")
    is_adapter = bool(model_cfg.init_from) and (Path(model_cfg.init_from) / "adapter_config.json").is_file()
    if meta and not is_adapter:
        from ..engine.meta_init import build_on_meta

        if not model_cfg.init_from:
            return build_on_meta(model_config(model_cfg))
        config = read_config(model_cfg.init_from)
        if model_cfg.attn_implementation is not None:
            config = config.replace(attn_implementation=model_cfg.attn_implementation)
        return build_on_meta(config, init_from=model_cfg.init_from)
    if model_cfg.init_from:
        return load_model(model_cfg.init_from, attn_implementation=model_cfg.attn_implementation)
    return LFM2ForCausalLM(model_config(model_cfg))


def lora_enabled(model_cfg: DictConfig) -> bool:
    lora = model_cfg.get("lora")
    return lora is not None and (lora.r > 0 or bool(lora.adapter))


def setup_lora(model: LFM2ForCausalLM, model_cfg: DictConfig, device: Any, seed: int) -> LoRAConfig | None:
    """Freeze `model` and attach the `model.lora` adapters (None, untouched, when LoRA is off).

    With `model.lora.adapter` the adapter directory's own config and weights are loaded (training continues
    from it); otherwise fresh adapters are initialised from `seed`, independent of the global RNG. QLoRA
    (`model.lora.quantize`) quantises the base on `device` first; it is refused off CUDA.
    """
    if not lora_enabled(model_cfg):
        if model_cfg.get("lora") is not None and model_cfg.lora.quantize != "none":
            raise ValueError("model.lora.quantize (QLoRA) needs LoRA adapters: set model.lora.r > 0")
        return None
    lora = model_cfg.lora
    base = str(Path(model_cfg.init_from).resolve()) if model_cfg.init_from else None
    quantize_base(model, lora.quantize, device, lora.compute_dtype)
    if lora.adapter:
        config = read_adapter_config(lora.adapter)
        if lora.r and lora.r != config.r:
            raise ValueError(f"model.lora.r={lora.r} but model.lora.adapter={lora.adapter} has r={config.r}; "
                             "leave model.lora.r at 0 to take the adapter's settings")
        config = dataclasses.replace(config, lora_dropout=lora.lora_dropout, base_model_name_or_path=base)
        apply_lora(model, config)
        load_lora_state(model, read_adapter_state(lora.adapter), source=str(lora.adapter))
        return config
    targets = lora.target_modules
    config = LoRAConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                        target_modules=OmegaConf.to_container(targets) if OmegaConf.is_config(targets) else targets,
                        use_rslora=lora.use_rslora, init_lora_weights=lora.init_lora_weights,
                        base_model_name_or_path=base)
    apply_lora(model, config, generator=torch.Generator().manual_seed(int(seed)))
    return config


def model_tokenizer_dir(init_from: str | None) -> Path | None:
    """The directory holding `model.init_from`'s own tokenizer, if it has one."""
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return Path(init_from)
    return None


def resolve_dataset(data_cfg: DictConfig, runtime: Any = None, tokenizer: Path | None = None) -> tuple[Path, Path]:
    """(dataset dir, tokenizer dir) for a stage. `data.path=None` prepares the bundled corpus once
    (cached under ~/.cache/lfm2_train, keyed by the job config) so the quick start needs no download —
    tokenized with `tokenizer` (a model's own) when given, so that model can read it."""
    if data_cfg.path is None:
        from ..jobs import run_job

        prepared = run_job("bundled", {"tokenizer": tokenizer}, runtime=runtime)
        return Path(prepared["dataset"]), Path(prepared["tokenizer"])
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
