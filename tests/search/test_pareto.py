"""Pareto front and exact hypervolume on point sets small enough to work out by hand."""

from __future__ import annotations

import itertools
import random

import pytest

from lfm2_train.search import (
    contributions,
    default_reference,
    dominates,
    hypervolume,
    pareto_front,
    pareto_layers,
    rank,
)

# Three mutually non-dominated points and one dominated by (1, 3, 2); reference (4, 4, 4).
# Boxes [p, r] have volumes 3*1*2 = 2*3*1 = 1*2*3 = 6; each pairwise intersection is 2 (e.g. the first
# two: [2,4] x [3,4] x [3,4]); all three meet in [3,4]^3 = 1. Union = 18 - 6 + 1 = 13.
# Removing one point leaves 6 + 6 - 2 = 10, so each front point contributes exactly 3.
POINTS = [(1, 3, 2), (2, 1, 3), (3, 2, 1), (3, 3, 3)]
REF = (4, 4, 4)


def test_front_and_layers():
    assert dominates((1, 1, 1), (1, 2, 1)) and not dominates((1, 2, 1), (1, 2, 1))
    assert pareto_front(POINTS) == [0, 1, 2]
    assert pareto_layers(POINTS) == [0, 0, 0, 1]
    # Duplicates of a front point are both on the front; a chain gives one layer per point.
    assert pareto_front([(1, 1, 1), (1, 1, 1), (2, 2, 2)]) == [0, 1]
    assert pareto_layers([(3, 3, 3), (1, 1, 1), (2, 2, 2)]) == [2, 0, 1]


def test_hypervolume_by_hand():
    assert hypervolume(POINTS, REF) == pytest.approx(13.0)
    assert hypervolume(POINTS[:3], REF) == pytest.approx(13.0)  # the dominated point adds nothing
    assert contributions(POINTS, REF) == pytest.approx([3.0, 3.0, 3.0, 0.0])
    assert hypervolume([(1, 1, 1)], REF) == pytest.approx(27.0)
    assert hypervolume([(5, 1, 1)], REF) == 0.0  # beyond the reference in one objective
    # 2-D staircase: (1, 3) and (2, 1) under (4, 4): 3*1 + 2*3 - 2*1 = 7.
    assert hypervolume([(1, 3), (2, 1)], (4, 4)) == pytest.approx(7.0)


def test_hypervolume_matches_a_grid_count():
    # Integer points under an integer reference: the volume is the number of unit cells dominated.
    rng = random.Random(0)
    pts = [tuple(rng.randint(0, 5) for _ in range(3)) for _ in range(7)]
    ref = (6, 6, 6)
    cells = sum(any(all(p[k] <= c[k] for k in range(3)) for p in pts)
                for c in itertools.product(range(6), repeat=3))
    assert hypervolume(pts, ref) == pytest.approx(cells)


def test_rank_and_reference():
    # B = (2, 2, 2) and A = (1, 1, 3) under (6, 6, 6): boxes 4*4*4 = 64 and 5*5*3 = 75 overlapping in
    # [2,6]^2 x [3,6] = 48, union 91; exclusive parts: A 91 - 64 = 27, B 91 - 75 = 16.
    # E = (2.5, 2.5, 2.5) is dominated by B only (layer 1); D = (5, 5, 5) by everything (layer 2).
    pts = [(2, 2, 2), (1, 1, 3), (5, 5, 5), (2.5, 2.5, 2.5)]
    ref = (6, 6, 6)
    assert hypervolume(pts, ref) == pytest.approx(91.0)
    assert contributions(pts[:2], ref) == pytest.approx([16.0, 27.0])
    # Against the whole set B's exclusive part shrinks: without B, E's box [2.5,6]^3 = 42.875 is uncovered
    # by A except [2.5,6]^2 x [3,6] = 36.75, so B adds 91 - (75 + 42.875 - 36.75) = 9.875.
    assert contributions(pts, ref) == pytest.approx([9.875, 27.0, 0.0, 0.0])
    assert pareto_layers(pts) == [0, 0, 2, 1]
    assert rank(pts, ref) == [1, 0, 3, 2]
    assert default_reference([(1, 10, 5), (3, 20, 5)], margin=0.1) == pytest.approx([3.2, 21.0, 5.5])
