"""Packing plans: each function reproduces, on random inputs, the packer it replaced (frozen copies below),
so the rows, their order and therefore every computed result stay the same."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from lfm2_train.data.packing import (
    batch_rows,
    batches_longest_first,
    decreasing_order,
    fill_row,
    first_fit_decreasing,
    longest_with_shortest,
)


# ------------------------------------------------------------------ frozen copies of the replaced packers
def _teacher_pack_segments(lengths: list[int], capacity: int, pack: bool) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not pack:
        return [[i] for i in order]
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def _teacher_group_rows(row_lengths: list[int], max_tokens: int) -> list[list[int]]:
    order = sorted(range(len(row_lengths)), key=lambda r: (-row_lengths[r], r))
    batches: list[list[int]] = []
    for r in order:
        if batches and (len(batches[-1]) + 1) * row_lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches


def _scoring_pack_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    by_len = np.argsort(-lengths, kind="stable")
    lo, hi = 0, len(by_len) - 1
    rows: list[list[int]] = []
    while lo <= hi:
        row = [int(by_len[lo])]
        used = int(lengths[by_len[lo]])
        lo += 1
        while lo <= hi and used + int(lengths[by_len[hi]]) <= capacity:
            row.append(int(by_len[hi]))
            used += int(lengths[by_len[hi]])
            hi -= 1
        rows.append(row)
    return rows


def _scoring_batch_rows(rows: list[list[int]], lengths: np.ndarray, max_tokens: int) -> Iterator[list[list[int]]]:
    batch: list[list[int]] = []
    longest = 0
    for row in rows:
        n = int(lengths[row].sum())
        if batch and (len(batch) + 1) * max(longest, n) > max_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(row)
        longest = max(longest, n)
    if batch:
        yield batch


def _stream_rows(lengths: list[int], need: int, cursor: int = 0, offset: int = 0) -> list:
    """The pre-training stream's row filling (`DocumentStream._skip_row`), recording the pieces it takes."""
    out = []
    while True:
        pieces, filled, saved = [], 0, (cursor, offset)
        while filled < need:
            if cursor >= len(lengths):
                cursor, offset = saved
                return out + [("stop", cursor, offset)]
            take = min(lengths[cursor] - offset, need - filled)
            pieces.append((cursor, offset, take))
            filled += take
            if offset + take == lengths[cursor]:
                cursor, offset = cursor + 1, 0
            else:
                offset += take
        if offset:
            offset -= 1
        out.append((pieces, cursor, offset))


def _random_lengths(rng: np.random.Generator, n: int, high: int) -> list[int]:
    # Many ties (small range) as well as spread-out values: tie order is where packers usually differ.
    return rng.integers(1, high + 1, size=n).tolist()


# ------------------------------------------------------------------ equivalence on random inputs
@pytest.mark.parametrize("seed", range(40))
def test_teacher_cache_packer_is_reproduced(seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(4, 64))
    lengths = _random_lengths(rng, int(rng.integers(0, 60)), capacity if seed % 2 else 6)
    assert first_fit_decreasing(lengths, capacity) == _teacher_pack_segments(lengths, capacity, pack=True)
    assert [[i] for i in decreasing_order(lengths)] == _teacher_pack_segments(lengths, capacity, pack=False)
    rows = first_fit_decreasing(lengths, capacity)
    row_len = [sum(lengths[i] for i in row) for row in rows]
    budget = int(rng.integers(1, 4 * capacity))
    assert batches_longest_first(row_len, budget) == _teacher_group_rows(row_len, budget)


@pytest.mark.parametrize("seed", range(40))
def test_scoring_packer_is_reproduced(seed):
    rng = np.random.default_rng(100 + seed)
    capacity = int(rng.integers(2, 96))
    lengths = np.asarray(_random_lengths(rng, int(rng.integers(0, 300)), capacity if seed % 2 else 5),
                         dtype=np.int64)
    rows = longest_with_shortest(lengths, capacity)
    assert rows == _scoring_pack_rows(lengths, capacity)
    budget = int(rng.integers(capacity, 5 * capacity))
    widths = [int(lengths[row].sum()) for row in rows]
    assert [[rows[i] for i in b] for b in batch_rows(widths, budget)] == list(
        _scoring_batch_rows(rows, lengths, budget))


@pytest.mark.parametrize("seed", range(40))
def test_stream_row_filling_is_reproduced(seed):
    rng = np.random.default_rng(200 + seed)
    lengths = _random_lengths(rng, int(rng.integers(1, 40)), int(rng.integers(1, 30)))
    need = int(rng.integers(2, 40))
    expected = _stream_rows(lengths, need)
    cursor = offset = 0
    for step in expected:
        plan = fill_row(lambda i: lengths[i], len(lengths), cursor, offset, need)
        if step[0] == "stop":
            assert plan is None and (cursor, offset) == step[1:]
            break
        assert plan == step
        _, cursor, offset = plan


# ------------------------------------------------------------------ the plans' own guarantees
def test_rows_respect_capacity_and_cover_every_index():
    rng = np.random.default_rng(7)
    lengths = _random_lengths(rng, 200, 50)
    for rows in (first_fit_decreasing(lengths, 50), longest_with_shortest(lengths, 50)):
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in row) <= 50 for row in rows)
    assert len(first_fit_decreasing(lengths, 50)) <= len(longest_with_shortest(lengths, 50)) + 5


def test_batches_keep_the_padded_budget():
    widths = [9, 3, 3, 3, 12, 1]
    assert batch_rows(widths, 12) == [[0], [1, 2, 3], [4], [5]]  # in order: 1 joins no row of 12
    assert batches_longest_first(widths, 12) == [[4], [0], [1, 2, 3, 5]]  # sorted: 4 rows x 3 tokens fit
    assert batch_rows([20, 1], 12) == [[0], [1]]  # wider than the budget: a batch of its own
    assert batch_rows([], 8) == [] and batches_longest_first([], 8) == []


def test_fill_row_overlaps_a_cut_document_by_one_token():
    # docs of 5 and 4 tokens, rows of 4: the first row cuts doc 0 after 4 tokens; the next row starts at
    # its 4th token (index 3), which was only a label in the first row.
    assert fill_row([5, 4].__getitem__, 2, 0, 0, 4) == ([(0, 0, 4)], 0, 3)
    assert fill_row([5, 4].__getitem__, 2, 0, 3, 4) == ([(0, 3, 2), (1, 0, 2)], 1, 1)
    assert fill_row([5, 4].__getitem__, 2, 1, 1, 4) is None  # 3 tokens left: an incomplete row
    assert fill_row([4, 4].__getitem__, 2, 0, 0, 4) == ([(0, 0, 4)], 1, 0)  # an exact fit needs no overlap
