"""Candidate enumeration: layouts, the parameter budget (exact counts), deduplication and sampling."""

from __future__ import annotations

import pytest

from lfm2_train.model import LFM2Config, LFM2ForCausalLM, get_preset
from lfm2_train.search import attention_positions, count_parameters, enumerate_candidates

GRID = dict(hidden_sizes=[32, 64], num_layers=[2, 4], attention_counts=[0, 1, 2], placements=["spread", "late"],
            conv_L_cache=[3, 5], ff_ratios=[2.0])


def test_attention_positions():
    assert attention_positions(4, 2, "spread") == [1, 3]  # the tiny preset's layout
    assert attention_positions(16, 6, "spread") == [2, 5, 7, 10, 13, 15]
    assert attention_positions(6, 2, "late") == [4, 5] and attention_positions(6, 2, "early") == [0, 1]
    assert attention_positions(3, 0, "spread") == []
    with pytest.raises(ValueError, match="placement"):
        attention_positions(4, 1, "middle")


def test_every_candidate_fits_the_budget_and_counts_are_exact():
    base = get_preset("tiny")
    res = enumerate_candidates(base, **GRID, param_budget=60_000)
    assert res.candidates and res.over_budget and res.not_sampled == 0
    assert all(c.params <= 60_000 for c in res.candidates)
    assert all(c.params > 60_000 for c in res.over_budget)
    for c in res.candidates[:3] + res.over_budget[:2]:  # the meta-device count equals a real model's
        model = LFM2ForCausalLM(LFM2Config.from_dict({**base.to_dict(), **c.overrides}))
        assert model.num_parameters() == c.params
        assert model.config.ff_dim == int(round(c.ff_ratio * c.hidden_size / 8)) * 8
        assert model.config.attention_layer_indices == list(c.attention)
        assert model.config.conv_L_cache == c.conv_L_cache
    # Distinct layouts only: 0 attention layers is one layout whatever the placement.
    names = [c.name for c in res.candidates + res.over_budget]
    assert len(names) == len(set(names))
    # Per width and kernel, distinct attention layouts: L4 -> none, [3], [1,3], [2,3]; L2 -> none, [1], [0,1]
    # (with one attention layer "spread" and "late" both put it at the top).
    assert len(names) == 2 * 2 * (4 + 3)
    assert count_parameters(base) == LFM2ForCausalLM(base).num_parameters()


def test_min_params_and_seeded_sampling():
    base = get_preset("tiny")
    res = enumerate_candidates(base, **GRID, param_budget=120_000, min_params=50_000)
    assert all(50_000 <= c.params <= 120_000 for c in res.candidates)
    a = enumerate_candidates(base, **GRID, param_budget=120_000, max_candidates=5, seed=1)
    b = enumerate_candidates(base, **GRID, param_budget=120_000, max_candidates=5, seed=1)
    assert [c.name for c in a.candidates] == [c.name for c in b.candidates] and len(a.candidates) == 5
    assert a.not_sampled == len(enumerate_candidates(base, **GRID, param_budget=120_000).candidates) - 5
    with pytest.raises(ValueError, match="stage.space.ff_ratios is empty"):
        enumerate_candidates(base, **{**GRID, "ff_ratios": []}, param_budget=1)
