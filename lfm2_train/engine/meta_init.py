"""Build the model on the meta device, shard it, then materialise and initialise it shard by shard.

With FSDP2 every rank would otherwise build the whole fp32 model on the CPU and move it whole to its device
before sharding. Instead the stage builds the model on `meta` (shapes only) and records how it is to be
initialised (`DeferredInit`: the generator state at build time, or an HF directory to load); the backend
shards it, allocates only the local shards (`to_empty`) and writes each parameter's values through
`assign_shard`, which makes the full value on the CPU one tensor at a time and keeps the rank's slice.

The values equal those of an eager `LFM2ForCausalLM(config)` built from the same generator state
(`LFM2ForCausalLM.init_like_eager` replays the generator draws of eager construction), so 1 process and N
sharded processes start from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ..model import LFM2Config, LFM2ForCausalLM
from ..model.hf_io import _init_runtime_buffers
from ..model.lfm2 import read_state_dict

ATTRIBUTE = "deferred_init"


@dataclass
class DeferredInit:
    """How a meta-built model gets its values: the CPU generator state at build time, or an HF directory."""

    rng_state: torch.Tensor
    init_from: str | None = None


def build_on_meta(config: LFM2Config, init_from: str | Path | None = None) -> LFM2ForCausalLM:
    """A model with meta parameters; its values come later, from `init_from` (an HF directory whose config is
    `config`) or from the generator state of now."""
    with torch.device("meta"):
        model = LFM2ForCausalLM(config)
    pending = DeferredInit(rng_state=torch.get_rng_state(), init_from=str(init_from) if init_from else None)
    setattr(model, ATTRIBUTE, pending)
    return model


def is_deferred(model: torch.nn.Module) -> bool:
    return getattr(model, ATTRIBUTE, None) is not None


@torch.no_grad()
def assign_shard(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write the part of the full CPU `value` that `target` holds: its local shard for a DTensor (sliced on the
    CPU, so only the shard ever reaches the device), the whole value for a plain tensor."""
    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(value.shape, target.device_mesh, target.placements)
        part = value[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]
        target.to_local().copy_(part)
    else:
        target.copy_(value)


@torch.no_grad()
def materialise(model: LFM2ForCausalLM, device: torch.device) -> None:
    """Allocate the (sharded) storage on `device` and fill it as recorded by `build_on_meta`."""
    pending: DeferredInit = getattr(model, ATTRIBUTE)
    model.to_empty(device=device)
    if pending.init_from is not None:
        state = read_state_dict(pending.init_from, model.config)
        for name, param in model.named_parameters():
            assign_shard(param, state[name])
        _init_runtime_buffers(model, device)
        for name, buf in model.named_buffers():
            if name in state:
                assign_shard(buf, state[name])
    else:
        # Start from the generator state of the build; leave the generator where eager construction would have
        # left it when nothing else drew from it in between (the usual case), else where it is now.
        now = torch.get_rng_state()
        torch.set_rng_state(pending.rng_state)
        model.init_like_eager(assign_shard)
        after = torch.get_rng_state()
        torch.set_rng_state(after if torch.equal(now, pending.rng_state) else now)
    setattr(model, ATTRIBUTE, None)
