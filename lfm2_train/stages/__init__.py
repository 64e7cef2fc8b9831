"""One module per stage; each exposes `run(cfg) -> dict` and is looked up by `cfg.stage.name`."""

from __future__ import annotations

import importlib
import random
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

STAGES = {
    "generate": "lfm2_train.stages.generate",
    "pretrain": "lfm2_train.stages.pretrain",
    "midtrain": "lfm2_train.stages.pretrain",
    "cache_teacher": "lfm2_train.stages.cache_teacher",
    "distill": "lfm2_train.stages.distill",
    "chain": "lfm2_train.stages.chain",
    # sft / preference (issue 6)
    "sft": "lfm2_train.stages.sft",
    "preference": "lfm2_train.stages.preference",
    # merge (issue 7)
    "merge": "lfm2_train.stages.merge",
    # eval / search (issue 8)
    "eval": "lfm2_train.stages.eval",
    "search": "lfm2_train.stages.search",
    "plan": "lfm2_train.stages.plan",
}


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    name = cfg.stage.name
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; available: {sorted(STAGES)}")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return importlib.import_module(STAGES[name]).run(cfg)
