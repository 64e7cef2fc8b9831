"""Which training backend wraps the model: `distributed.TorchBackend` (none / DDP / FSDP2) or DeepSpeed.

The choice sits above both backends so that `deepspeed_backend.py` may build on `distributed.py` (the runtime,
activation checkpointing) without `distributed.py` importing it back.
"""

from __future__ import annotations

from typing import Any

from ..model import LFM2ForCausalLM
from .distributed import Runtime, TorchBackend


def make_backend(model: LFM2ForCausalLM, cfg: Any, runtime: Runtime, trainable_only: bool = False) -> Any:
    """The backend for `cfg.distributed.backend`; DeepSpeed is imported only when chosen."""
    if cfg.distributed.backend == "deepspeed":
        if trainable_only:
            raise ValueError("LoRA (model.lora.r > 0) runs with distributed.backend none, ddp or fsdp2; the frozen "
                             "base is sharded by fsdp2 (the ZeRO-3 equivalent)")
        from .deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(model, cfg, runtime)
    return TorchBackend(model, cfg, runtime, trainable_only)
