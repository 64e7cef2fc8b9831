"""Budgets and ranking on a synthetic measurement table (no timing involved)."""

from __future__ import annotations

import pytest

from lfm2_train.search import Budgets, budget_violation, rank_rows


def _m(ttft, p95, rss):
    return {"contexts": {"128": {"ttft_ms": ttft / 2, "decode_p95_ms": p95 / 2},
                         "512": {"ttft_ms": ttft, "decode_p95_ms": p95}}, "peak_rss_mb": rss}


def test_over_budget_candidates_are_rejected_with_the_reason():
    b = Budgets(max_ttft_ms=100, max_decode_ms=10, max_rss_mb=500)
    assert budget_violation(_m(90, 9, 400), b) is None
    status, why = budget_violation(_m(150, 9, 400), b)
    assert status == "over_latency_budget" and why == "TTFT 150.0 ms > budget 100 ms at context 512"
    status, why = budget_violation(_m(90, 12, 400), b)
    assert status == "over_latency_budget" and "decode p95 12.00 ms > budget 10 ms at context 512" == why
    status, why = budget_violation(_m(90, 9, 501), b)
    assert status == "over_memory_budget" and "peak RSS 501.0 MB" in why
    assert budget_violation(_m(1e6, 1e6, 1e6), Budgets()) is None


def test_rank_rows_on_a_synthetic_table():
    # (loss, latency, memory) = the hand-checked set of test_pareto.py, plus rejected / dominated rows.
    rows = [
        {"name": "a", "status": "ranked", "val_loss": 1, "latency": 3, "memory": 2},
        {"name": "b", "status": "ranked", "val_loss": 2, "latency": 1, "memory": 3},
        {"name": "c", "status": "ranked", "val_loss": 3, "latency": 2, "memory": 1},
        {"name": "d", "status": "ranked", "val_loss": 3, "latency": 3, "memory": 3},  # dominated by a
        {"name": "e", "status": "over_latency_budget", "val_loss": None, "latency": 0.1, "memory": 0.1},
    ]
    info = rank_rows(rows, reference=[4, 4, 4])
    assert info["hypervolume"] == pytest.approx(13.0) and info["reference"] == [4, 4, 4]
    by = {r["name"]: r for r in rows}
    assert [by[n]["pareto_layer"] for n in "abcd"] == [0, 0, 0, 1]
    assert [by[n]["hv_contribution"] for n in "abc"] == pytest.approx([3, 3, 3])
    assert [by[n]["hv_share"] for n in "abcd"] == pytest.approx([3 / 13] * 3 + [0])
    assert [by[n]["rank"] for n in "abcd"] == [1, 2, 3, 4]  # ties keep input order; the dominated one last
    assert "rank" not in by["e"]  # a rejected candidate is never ranked
    with pytest.raises(ValueError, match="3 values"):
        rank_rows(rows, reference=[1, 2])
    default = rank_rows([dict(r) for r in rows])
    assert default["reference"] == pytest.approx([3.2, 3.2, 3.2])
