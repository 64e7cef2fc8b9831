"""PEFT-format adapter directories: `adapter_config.json` + `adapter_model.safetensors`.

Keys on disk are PEFT's: `base_model.model.<module path>.lora_A.weight` (and `lora_B`,
`lora_embedding_A` / `lora_embedding_B` for the token embedding). Our module paths equal `transformers`'
Lfm2 module paths, so `peft.PeftModel.from_pretrained(Lfm2ForCausalLM, dir)` reads what we write and we read
what PEFT writes. An adapter directory records its base in `base_model_name_or_path`; `load_model` follows
that (recursively, so an adapter trained on top of another adapter's model works) and folds the adapters,
which lets every stage take an adapter directory wherever it takes a checkpoint directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .lfm2 import LFM2ForCausalLM
from .lora import LoRAConfig, LoRAError, apply_lora, fold_lora, is_lora_key, load_lora_state

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."


def is_adapter_dir(path: str | Path | None) -> bool:
    """A PEFT adapter directory (as opposed to a full checkpoint): it has adapter_config.json."""
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter_config(directory: str | Path) -> LoRAConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}: not a PEFT adapter directory")
    return LoRAConfig.from_peft_dict(json.loads(path.read_text()), source=str(path))


def save_adapter(state: dict[str, torch.Tensor], config: LoRAConfig, directory: str | Path) -> Path:
    """Write an adapter (our keys, adapter tensors only) in PEFT's layout and key naming."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if is_lora_key(k)}
    if not tensors:
        raise LoRAError("no adapter tensors to save (keys ending in lora_A.weight / lora_B.weight / lora_embedding_*)")
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config.to_peft_dict(), indent=2, sort_keys=True) + "\n")
    return directory


def read_adapter_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Adapter tensors under our keys; PEFT's optional `.default` adapter-name infix is dropped too."""
    directory = Path(directory)
    if (directory / ADAPTER_WEIGHTS).is_file():
        with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}
    elif (directory / ADAPTER_BIN).is_file():
        raw = torch.load(directory / ADAPTER_BIN, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory} has no {ADAPTER_WEIGHTS} (or {ADAPTER_BIN})")
    out = {}
    for key, tensor in raw.items():
        if not is_lora_key(key):
            raise LoRAError(f"{directory}: tensor {key} is not a LoRA A/B matrix (trainable tokens, DoRA "
                            "magnitudes and saved modules are not supported)")
        key = key.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.",
                                                                                          ".lora_B.")
        out[key] = tensor
    return out


def load_adapter(model: LFM2ForCausalLM, directory: str | Path) -> LoRAConfig:
    """Attach the adapter in `directory` to `model` (adapters live, base frozen); -> its config."""
    config = read_adapter_config(directory)
    apply_lora(model, config)
    load_lora_state(model, read_adapter_state(directory), source=str(directory))
    return config


def adapter_base(directory: str | Path) -> Path:
    """The base checkpoint an adapter directory names (absolute, or relative to the adapter directory)."""
    config = read_adapter_config(directory)
    base = config.base_model_name_or_path
    if not base:
        raise LoRAError(f"{directory}/{ADAPTER_CONFIG} names no base_model_name_or_path; give the base explicitly")
    path = Path(base)
    if not path.is_absolute() and not path.is_dir():
        path = Path(directory) / base
    if not path.is_dir():
        raise FileNotFoundError(f"{directory}: base model {base} (base_model_name_or_path) is not a local "
                                "directory; give the base explicitly")
    return path


def load_model(path: str | Path, *, base: str | Path | None = None, dtype: torch.dtype | str | None = torch.float32,
               device: torch.device | str = "cpu", attn_implementation: str | None = None) -> LFM2ForCausalLM:
    """A checkpoint directory, or an adapter directory folded into its base (`base` or the recorded one)."""
    if not is_adapter_dir(path):
        return LFM2ForCausalLM.from_pretrained(path, dtype=dtype, device=device,
                                               attn_implementation=attn_implementation)
    base_dir = Path(base) if base is not None else adapter_base(path)
    model = load_model(base_dir, dtype=dtype, device=device, attn_implementation=attn_implementation)
    load_adapter(model, path)
    fold_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
