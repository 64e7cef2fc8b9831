"""Windows of a long document (each after the first restarts `overlap` tokens early), first-fit-decreasing
packing of windows into rows, and rows grouped into batches under a token budget."""

from __future__ import annotations

import pytest

from lfm2_train.data.document_windows import document_windows
from lfm2_train.data.packing import batches_longest_first, decreasing_order, first_fit_decreasing


def test_windows_of_a_long_document():
    assert document_windows(150, 64, 16) == [(0, 0, 64), (48, 64, 112), (96, 112, 150)]
    assert document_windows(128, 64, 0) == [(0, 0, 64), (64, 64, 128)]
    assert document_windows(10, 64, 16) == [(0, 0, 10)]
    assert first_fit_decreasing([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]


def test_windows_need_an_overlap_below_the_window():
    with pytest.raises(ValueError, match="window_overlap=64"):
        document_windows(100, 64, 64)


def test_unpacked_rows_hold_one_segment_longest_first_and_batches_respect_the_budget():
    assert [[i] for i in decreasing_order([5, 3, 4, 2])] == [[0], [2], [1], [3]]
    assert batches_longest_first([4, 8, 2, 8], max_tokens=16) == [[1, 3], [0, 2]]
    assert batches_longest_first([20, 3], max_tokens=16) == [[0], [1]]  # a row over the budget still gets its own batch
