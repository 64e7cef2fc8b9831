"""The layouts a search considers: width x depth x attention count/placement x conv kernel x FF ratio,
kept only when the exact parameter count (the model built on the meta device) fits the budget."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import LFM2Config, LFM2ForCausalLM
from ..model.config import ATTENTION, CONV

PLACEMENTS = ("spread", "late", "early")


def attention_positions(n_layers: int, n_attention: int, placement: str) -> list[int]:
    """Indices of the attention layers. `spread`: evenly spaced, the last one at the top (LFM2's published
    layouts interleave like this); `late`: the top `n` layers; `early`: the bottom `n` layers."""
    if not 0 <= n_attention <= n_layers:
        raise ValueError(f"cannot place {n_attention} attention layers in {n_layers} layers")
    if placement not in PLACEMENTS:
        raise ValueError(f"attention placement {placement!r}; choose one of {PLACEMENTS}")
    if n_attention == 0:
        return []
    if placement == "late":
        return list(range(n_layers - n_attention, n_layers))
    if placement == "early":
        return list(range(n_attention))
    step = n_layers / n_attention
    return sorted({n_layers - 1 - int(k * step) for k in range(n_attention)})


@dataclass(frozen=True)
class Candidate:
    hidden_size: int
    num_layers: int
    attention: tuple[int, ...]  # attention layer indices
    conv_L_cache: int
    ff_ratio: float
    params: int = 0
    overrides: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def name(self) -> str:
        attn = ",".join(map(str, self.attention)) or "-"
        return f"d{self.hidden_size}-L{self.num_layers}-a[{attn}]-k{self.conv_L_cache}-ff{self.ff_ratio:g}"

    @property
    def layout(self) -> str:
        """One letter per layer, bottom to top: C = conv, A = attention."""
        return "".join("A" if i in self.attention else "C" for i in range(self.num_layers))


def candidate_overrides(base: LFM2Config, hidden: int, layers: int, attention: list[int], conv_L_cache: int,
                        ff_ratio: float, head_dim: int) -> dict[str, Any]:
    """LFM2Config fields (model.overrides) for one layout; the SwiGLU width is exactly ff_ratio * hidden
    (rounded to a multiple of 8, no auto-adjust) so the FF ratio means what it says."""
    if hidden % head_dim:
        raise ValueError(f"hidden size {hidden} is not a multiple of search head_dim {head_dim}")
    heads = hidden // head_dim
    kv_ratio = max(base.num_attention_heads // base.num_key_value_heads, 1)
    kv = max(heads // kv_ratio, 1)
    while heads % kv:
        kv -= 1
    return {"hidden_size": hidden, "num_hidden_layers": layers,
            "layer_types": [ATTENTION if i in attention else CONV for i in range(layers)],
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "intermediate_size": max(8, int(round(ff_ratio * hidden / 8)) * 8), "block_auto_adjust_ff_dim": False,
            "conv_L_cache": conv_L_cache}


def count_parameters(config: LFM2Config) -> int:
    """Exact unique-parameter count (tied head once), without allocating any weights."""
    with torch.device("meta"):
        return LFM2ForCausalLM(config).num_parameters()


@dataclass
class SpaceResult:
    candidates: list[Candidate]  # within budget (and sampled down to max_candidates)
    over_budget: list[Candidate]  # built and counted, but over the parameter budget
    not_sampled: int  # within budget but left out by the max_candidates cap


def enumerate_candidates(base: LFM2Config, hidden_sizes: list[int], num_layers: list[int],
                         attention_counts: list[int], placements: list[str], conv_L_cache: list[int],
                         ff_ratios: list[float], param_budget: int, head_dim: int = 16, min_params: int = 0,
                         max_candidates: int | None = None, seed: int = 0) -> SpaceResult:
    """Every distinct layout of the grid, split by `min_params <= params <= param_budget`.

    When more than `max_candidates` fit, a seeded random subset is kept (always the same for a seed).
    """
    for name, values in (("hidden_sizes", hidden_sizes), ("num_layers", num_layers),
                         ("attention_counts", attention_counts), ("placements", placements),
                         ("conv_L_cache", conv_L_cache), ("ff_ratios", ff_ratios)):
        if not values:
            raise ValueError(f"search space: stage.space.{name} is empty")
    seen: set[tuple] = set()
    inside, over = [], []
    for hidden, layers, n_attn, placement, k, ff in itertools.product(
            hidden_sizes, num_layers, attention_counts, placements, conv_L_cache, ff_ratios):
        if n_attn > layers:
            continue
        attn = tuple(attention_positions(layers, n_attn, placement))
        key = (hidden, layers, attn, k, float(ff))
        if key in seen:  # e.g. 0 attention layers: every placement is the same layout
            continue
        seen.add(key)
        overrides = candidate_overrides(base, hidden, layers, list(attn), k, ff, head_dim)
        config = LFM2Config.from_dict({**base.to_dict(), **overrides}, source="search space")
        cand = Candidate(hidden, layers, attn, k, float(ff), count_parameters(config), overrides)
        (inside if min_params <= cand.params <= param_budget else over).append(cand)
    not_sampled = 0
    if max_candidates is not None and len(inside) > max_candidates:
        keep = set(random.Random(seed).sample(range(len(inside)), max_candidates))
        not_sampled = len(inside) - max_candidates
        inside = [c for i, c in enumerate(inside) if i in keep]
    return SpaceResult(inside, over, not_sampled)
