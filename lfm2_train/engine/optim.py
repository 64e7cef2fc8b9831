"""AdamW with explicit weight-decay exclusions, and learning-rate schedules as pure functions of the step.

A schedule that is a function of the step alone needs no state of its own to resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..model.layers import RMSNorm

NO_DECAY_KINDS = ("norm", "embedding", "bias", "conv")
SCHEDULES = ("constant", "cosine", "linear", "wsd", "decay")
DECAY_SHAPES = ("linear", "cosine", "sqrt")


def _kind(module: nn.Module, name: str) -> str:
    if isinstance(module, RMSNorm):
        return "norm"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if name == "bias":
        return "bias"
    if isinstance(module, nn.Conv1d):
        return "conv"
    return "matrix"


def param_groups(model: nn.Module, weight_decay: float, no_decay: list[str]) -> list[dict]:
    """Split parameters into decayed / not decayed. A tied head counts as the embedding it shares."""
    unknown = sorted(set(no_decay) - set(NO_DECAY_KINDS))
    if unknown:
        raise ValueError(f"optim.no_decay has unknown kinds {unknown}; choose from {NO_DECAY_KINDS}")
    decay, skip, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            (skip if _kind(module, name) in no_decay else decay).append(param)
    # Parameters that live directly on non-standard modules (e.g. MoE expert tensors) are matrices: decay.
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if skip:
        groups.append({"params": skip, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay, list(cfg.no_decay))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


@dataclass
class LRSchedule:
    """lr(step) for `schedule` in SCHEDULES; `step` counts optimizer steps from 0.

    - cosine / linear: warmup, then down to min_lr at max_steps;
    - wsd: warmup, constant, then the last `decay_fraction` of the run decays (shape `decay_shape`);
    - decay: no plateau, decay from lr to min_lr across the whole run after warmup — the accelerated
      final decay used when mid-training continues from a pre-training checkpoint.
    """

    lr: float
    min_lr: float
    max_steps: int
    schedule: str = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ValueError(f"optim.decay_shape={self.decay_shape!r}; choose one of {DECAY_SHAPES}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"optim.decay_fraction={self.decay_fraction} must be in [0, 1]")

    def _shape(self, t: float) -> float:
        """Decay factor for progress t in [0, 1]: 1 -> 0."""
        t = min(max(t, 0.0), 1.0)
        if self.decay_shape == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if self.decay_shape == "sqrt":
            return 1 - math.sqrt(t)
        return 1 - t

    def __call__(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        span = max(self.max_steps - self.warmup_steps, 1)
        t = (step - self.warmup_steps) / span
        if self.schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        elif self.schedule == "linear":
            factor = 1 - min(t, 1.0)
        elif self.schedule == "decay":
            factor = self._shape(t)
        else:  # wsd
            decay_steps = self.decay_fraction * self.max_steps
            start = self.max_steps - decay_steps
            factor = 1.0 if step < start else self._shape((step - start) / max(decay_steps, 1))
        return self.min_lr + (self.lr - self.min_lr) * factor

    @classmethod
    def from_config(cls, cfg, max_steps: int) -> LRSchedule:
        return cls(lr=cfg.lr, min_lr=cfg.min_lr, max_steps=max_steps, schedule=cfg.schedule,
                   warmup_steps=cfg.warmup_steps, decay_fraction=cfg.decay_fraction, decay_shape=cfg.decay_shape)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
