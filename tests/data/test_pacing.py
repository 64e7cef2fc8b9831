"""Pacing: competence functions (monotone, right endpoints) and the paced document stream's guarantees —
kind "none" reads the order, nothing repeats before every admitted document is read, and any window of
the stream is reproducible (resume)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lfm2_train.data import pacing
from lfm2_train.data.pacing import PacingConfig, admitted_counts, admitted_fraction, paced_indices

CONFIGS = [
    PacingConfig(),
    PacingConfig(kind="linear", start_fraction=0.1, full_at=1.0),
    PacingConfig(kind="linear", start_fraction=0.3, full_at=0.5),
    PacingConfig(kind="root", start_fraction=0.05, full_at=0.8),
    PacingConfig(kind="step", start_fraction=0.2, full_at=0.9, steps=[[0.3, 0.4], [0.6, 0.7]]),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.kind)
def test_admitted_fraction_is_monotone_in_range(cfg: PacingConfig) -> None:
    grid = np.linspace(0.0, 1.0, 1001)
    values = np.array([admitted_fraction(p, cfg) for p in grid])
    assert np.all(np.diff(values) >= 0)
    assert np.all((values > 0) & (values <= 1))
    assert values[-1] == 1.0 and admitted_fraction(1.7, cfg) == 1.0  # past the end stays fully admitted
    expected_start = 1.0 if cfg.kind == "none" else cfg.start_fraction
    assert values[0] == pytest.approx(expected_start)
    assert admitted_fraction(cfg.full_at, cfg) == 1.0


def test_competence_formulas() -> None:
    lin = PacingConfig(kind="linear", start_fraction=0.2, full_at=0.5)
    assert admitted_fraction(0.25, lin) == pytest.approx(0.2 + 0.8 * 0.5)
    assert admitted_fraction(0.4, lin) == pytest.approx(0.2 + 0.8 * 0.8)
    root = PacingConfig(kind="root", start_fraction=0.1, full_at=0.5)
    assert admitted_fraction(0.2, root) == pytest.approx(math.sqrt(0.01 + 0.99 * 0.4))
    assert admitted_fraction(0.2, root) > 0.1 + 0.9 * 0.4  # root admits faster than linear early on
    step = CONFIGS[-1]
    assert [admitted_fraction(p, step) for p in (0.0, 0.29, 0.3, 0.59, 0.6, 0.89, 0.9)] == \
        pytest.approx([0.2, 0.2, 0.4, 0.4, 0.7, 0.7, 1.0])
    with pytest.raises(ValueError, match="progress"):
        admitted_fraction(-0.1, lin)


@pytest.mark.parametrize("bad, match", [
    (dict(kind="cosine"), "kind"),
    (dict(kind="linear", start_fraction=0.0), "start_fraction"),
    (dict(kind="root", full_at=1.5), "full_at"),
    (dict(kind="linear", steps=[[0.5, 0.5]]), "only used with kind 'step'"),
    (dict(kind="step", steps=[[0.5, 0.6], [0.4, 0.7]]), "increase strictly"),
    (dict(kind="step", steps=[[0.3, 0.6], [0.4, 0.5]]), "nondecreasing"),
])
def test_invalid_pacing_is_refused(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PacingConfig(**bad)


def test_admitted_counts_are_exact_at_round_fractions() -> None:
    # 0.1 * 10 is 1.0000000000000002 in floating point; that must admit 1 document, not 2.
    counts = admitted_counts(10, 100, PacingConfig(kind="linear", start_fraction=0.1))
    assert counts[0] == 1 and counts[-1] == 10 and np.all(np.diff(counts) >= 0)


def _check_stream(order: np.ndarray, out: np.ndarray, cfg: PacingConfig) -> None:
    """Property (b) and admission: at every sample, the document is inside the admitted prefix, and a
    repeat happens only once every admitted document has been read."""
    n = len(out)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    counts = admitted_counts(len(order), n, cfg)
    seen = np.zeros(len(order), dtype=bool)
    for i, doc in enumerate(out):
        assert rank[doc] < counts[i], f"sample {i} reads document {doc} before it is admitted"
        if seen[doc]:
            assert seen[order[:counts[i]]].all(), f"sample {i} repeats while admitted documents are unread"
        seen[doc] = True


def test_none_reads_exactly_the_order_then_reshuffles() -> None:
    order = np.random.default_rng(0).permutation(50)
    out = paced_indices(order, 125, PacingConfig(), seed=3)
    np.testing.assert_array_equal(out[:50], order)
    np.testing.assert_array_equal(np.sort(out[50:100]), np.arange(50))  # second epoch: a full permutation
    assert not np.array_equal(out[50:100], order)
    _check_stream(order, out, PacingConfig())


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=lambda c: c.kind)
def test_paced_stream_properties(cfg: PacingConfig) -> None:
    order = np.random.default_rng(1).permutation(40)
    out = paced_indices(order, 130, cfg, seed=7)
    assert len(out) == 130
    _check_stream(order, out, cfg)
    assert set(out.tolist()) == set(order.tolist())  # every document is eventually read
    # Easy documents are admitted first and therefore revisited at least as often as the hardest.
    freq = np.bincount(out, minlength=40)
    assert freq[order[:4]].mean() > freq[order[-4:]].mean()


def test_one_epoch_reads_the_order_even_with_pacing() -> None:
    # Documented consequence of "new documents first": A(i) >= i, so pacing never reorders one pass.
    order = np.random.default_rng(2).permutation(30)
    cfg = PacingConfig(kind="root", start_fraction=0.1, full_at=1.0)
    np.testing.assert_array_equal(paced_indices(order, 30, cfg, seed=0), order)
    np.testing.assert_array_equal(paced_indices(order, 12, cfg, seed=0), order[:12])


def test_stream_is_a_pure_function_resumable_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    order = np.random.default_rng(3).permutation(25)
    cfg = PacingConfig(kind="linear", start_fraction=0.2, full_at=0.7)
    full = paced_indices(order, 200, cfg, seed=11)
    np.testing.assert_array_equal(full, paced_indices(order.tolist(), 200, cfg, seed=11))
    assert not np.array_equal(full, paced_indices(order, 200, cfg, seed=12))  # the seed drives revisits
    for start, stop in [(0, 1), (17, 18), (40, 133), (199, 200), (150, 150)]:
        np.testing.assert_array_equal(paced_indices(order, 200, cfg, seed=11, start=start, stop=stop),
                                      full[start:stop])
    monkeypatch.setattr(pacing, "_CHUNK", 7)  # chunk boundaries must not change a single sample
    np.testing.assert_array_equal(paced_indices(order, 200, cfg, seed=11), full)
    np.testing.assert_array_equal(paced_indices(order, 200, cfg, seed=11, start=61, stop=95), full[61:95])
    with pytest.raises(ValueError, match="start"):
        paced_indices(order, 200, cfg, start=10, stop=5)
