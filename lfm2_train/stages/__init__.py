"""One module per stage; each exposes `run(cfg) -> dict` and is looked up by `cfg.stage.name`."""

from __future__ import annotations

import importlib
import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, open_dict

STAGES = {
    "generate": "lfm2_train.stages.generate",
    "pretrain": "lfm2_train.stages.pretrain",
    "midtrain": "lfm2_train.stages.pretrain",
    "cache_teacher": "lfm2_train.stages.cache_teacher",
    "distill": "lfm2_train.stages.distill",
    "chain": "lfm2_train.stages.chain",
    "sft": "lfm2_train.stages.sft",
    "preference": "lfm2_train.stages.preference",
    "merge": "lfm2_train.stages.merge",
    "eval": "lfm2_train.stages.eval",
    "search": "lfm2_train.stages.search",
    "export": "lfm2_train.stages.export",
    "plan": "lfm2_train.stages.plan",
}


def _single_process_fallback(cfg: DictConfig) -> None:
    """A recipe written for a cluster (`distributed=ddp|fsdp2`) started without a launcher runs as one plain
    process, instead of failing on a process group that does not exist."""
    import os

    import torch.distributed as dist

    backend = cfg.distributed.backend
    if backend in ("ddp", "fsdp2") and "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        print(f"note: distributed={backend} needs a launcher (torchrun, launch/*.sh); started as one process, so "
              f"running without a data-parallel wrapper (distributed=none)")
        with open_dict(cfg):
            cfg.distributed.backend = "none"


def run_stage(cfg: DictConfig, recipe: str | None = None) -> dict[str, Any]:
    """Validate `cfg` (unknown keys, value ranges, a recipe's required values), then run its stage.
    `recipe` is the `recipe=` choice, when known, whose `???` values must be given."""
    from ..config.validate import validate

    name = cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; available: {sorted(STAGES)}")
    validate(cfg, recipe)
    _single_process_fallback(cfg)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return importlib.import_module(STAGES[name]).run(cfg)
