"""Read and write Hugging Face LFM2 / LFM2-MoE checkpoint directories.

On disk (what the Hub, `transformers` and llama.cpp's converter use):
- dense tensors under their module names, `lm_head.weight` omitted when tied;
- MoE experts one per expert, `feed_forward.experts.{j}.{w1,w3,w2}.weight`, plus the fp32
  `feed_forward.expert_bias` buffer. `transformers` may also write the fused in-memory layout
  (`experts.gate_up_proj` (E, 2F, d) / `experts.down_proj` (E, d, F)); both are read.
Tensors are read one at a time through `safe_open`, so loading never holds two copies of a model.

This module knows the file layout, not the model class: the model (`lfm2.py`) builds itself and passes its own
state dict as the reference a checkpoint is checked against, so the model imports this module, never the reverse.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import LFM2Config, LFM2ConfigError
from .layers import RotaryEmbedding
from .moe import MoEFeedForward

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
_PER_EXPERT = re.compile(r"^(.*\.feed_forward\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
_FUSED = re.compile(r"^(.*\.feed_forward\.experts)\.(gate_up_proj|down_proj)$")


class CheckpointError(ValueError):
    """A checkpoint directory does not match the model it claims to be."""


# ---------------------------------------------------------------------------------------------- reading
def _weight_files(path: Path) -> list[Path]:
    index = path / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if (path / SAFE_SINGLE).is_file():
        return [path / SAFE_SINGLE]
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"no model.safetensors, {SAFE_INDEX} or pytorch_model*.bin in {path}")


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (disk key, tensor) one at a time from a checkpoint directory."""
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _to_internal(path: Path, config: LFM2Config, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Disk keys -> our state-dict keys (experts stacked), cast to `dtype` as each tensor arrives."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[tuple[str, str], dict[int, torch.Tensor]] = defaultdict(dict)

    def cast(t: torch.Tensor, key: str) -> torch.Tensor:
        if key.endswith("expert_bias"):  # routing bias stays fp32, as in the released checkpoints
            return t.float()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    for key, tensor in iter_checkpoint_tensors(path):
        if m := _PER_EXPERT.match(key):
            per_expert[(m.group(1), m.group(3))][int(m.group(2))] = cast(tensor, key)
        elif m := _FUSED.match(key):
            prefix, kind = m.groups()
            tensor = cast(tensor, key)
            if kind == "gate_up_proj":  # (E, 2F, d): gate (w1) then up (w3)
                out[f"{prefix}.w1"], out[f"{prefix}.w3"] = (t.contiguous() for t in tensor.chunk(2, dim=1))
            else:
                out[f"{prefix}.w2"] = tensor
        else:
            out[key] = cast(tensor, key)
    for (prefix, name), experts in per_expert.items():
        missing = sorted(set(range(config.num_experts)) - set(experts))
        if missing:
            raise CheckpointError(f"{path}: {prefix} is missing experts {missing} for {name}")
        out[f"{prefix}.{name}"] = torch.stack([experts[j] for j in range(config.num_experts)])
    return out


def _init_runtime_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Non-persistent buffers are not in checkpoints; rebuild them after a meta-device load."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = RotaryEmbedding(model.config.head_size, model.config.rope_theta).inv_freq.to(device)
        elif isinstance(module, MoEFeedForward):
            module.expert_load = torch.zeros(model.config.num_experts, dtype=torch.float32, device=device)
            if not module.use_expert_bias:
                module.expert_bias = torch.zeros(model.config.num_experts, dtype=torch.float32, device=device)


def read_config(path: str | Path) -> LFM2Config:
    """config.json of a checkpoint directory; refuses other model types with a message naming them."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") not in ("lfm2", "lfm2_moe"):
        raise CheckpointError(
            f"{path} holds a {raw.get('model_type')!r} model (config.json model_type); "
            "lfm2_train loads only 'lfm2' and 'lfm2_moe' checkpoints"
        )
    return LFM2Config.from_hf_dict(raw, source=str(config_file))


def read_checked_state_dict(path: str | Path, config: LFM2Config, reference: Mapping[str, torch.Tensor],
                            dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (tied head included) from a checkpoint, checked key by key and shape by shape against
    `reference` (the state dict of the model `config` describes; meta tensors are enough)."""
    path = Path(path)
    state = _to_internal(path, config, dtype)
    expected = set(reference)
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)  # some exporters write the tied head anyway
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config.json: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(reference[key].shape)}"
            )
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


# ---------------------------------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse shard size {size!r} (use e.g. '5GB' or bytes)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def to_disk_tensors(state: dict[str, torch.Tensor], config: LFM2Config, dtype: torch.dtype | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (disk key, tensor) in checkpoint layout: experts split per expert, tied head dropped."""
    for key, tensor in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if not key.endswith("expert_bias") and dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        m = re.match(r"^(.*\.feed_forward\.experts)\.(w1|w2|w3)$", key)
        if m:
            for j in range(tensor.shape[0]):
                yield f"{m.group(1)}.{j}.{m.group(2)}.weight", tensor[j]
        else:
            yield key, tensor


def write_checkpoint(
    state: dict[str, torch.Tensor],
    config: LFM2Config,
    path: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
) -> Path:
    """A Hugging Face directory from a state dict (our keys): safetensors, config.json, generation_config."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    limit = _parse_size(max_shard_size)

    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for key, tensor in to_disk_tensors(state, config, dtype):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][key] = tensor.detach().to("cpu").contiguous().clone()
        sizes[-1] += nbytes
        # Note: tensors are cloned so per-expert slices do not share storage (safetensors refuses that).

    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / SAFE_SINGLE), metadata=metadata)
    else:
        weight_map = {}
        n = len(shards)
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(path / name), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    saved_dtype = dtype or state["model.embed_tokens.weight"].dtype
    config.save(path, dtype=str(saved_dtype).removeprefix("torch."))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


__all__ = ["CheckpointError", "LFM2ConfigError", "iter_checkpoint_tensors", "read_checked_state_dict", "read_config",
           "to_disk_tensors", "write_checkpoint"]
