"""Packing token sequences into rows and rows into batches: pure functions of lengths.

Every caller holds documents (or windows of them) of known length and needs (a) rows of at most
`capacity` tokens — several sequences per row, kept apart by document ids — and (b) batches whose padded
size, rows x widest row, stays within a token budget. The functions here see lengths only and return
indices, so the caller's data never moves until it fills a row, and every plan is deterministic in its
input (a resumed job recomputes exactly the same rows).

- `first_fit_decreasing`: rows as full as a classic bin packer makes them; O(n x rows) (teacher caching,
  where a block holds few windows).
- `longest_with_shortest`: the longest remaining sequence topped up with the shortest ones that still fit;
  O(n log n) and near-full rows without a bin-packing solver (model-loss scoring of a whole dataset).
- `batch_rows` / `batches_longest_first`: rows grouped under a rows x widest-row budget.
- `fill_row`: a fixed-length row cut from a document *sequence* in order, documents split across rows (the
  pre-training stream); it plans the row from lengths alone, so a rank can step over rows it does not read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Piece = tuple[int, int, int]  # (position in the sequence, first token, token count)


def decreasing_order(lengths: Sequence[int] | np.ndarray) -> list[int]:
    """Indices of `lengths`, longest first; equal lengths keep their index order."""
    return np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()


def first_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of indices: each length, longest first, goes into the first row with room left for it.

    A length above `capacity` gets a row of its own (the caller decides whether that may happen)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in decreasing_order(lengths):
        n = int(lengths[i])
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def longest_with_shortest(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Rows of indices: the longest remaining length first, topped up with the shortest remaining ones while
    they fit. Rows come out longest-led first. Every length must be <= capacity."""
    by_len = decreasing_order(lengths)
    lo, hi = 0, len(by_len) - 1
    rows: list[list[int]] = []
    while lo <= hi:
        row = [by_len[lo]]
        used = int(lengths[by_len[lo]])
        lo += 1
        while lo <= hi and used + int(lengths[by_len[hi]]) <= capacity:
            row.append(by_len[hi])
            used += int(lengths[by_len[hi]])
            hi -= 1
        rows.append(row)
    return rows


def batch_rows(widths: Sequence[int] | np.ndarray, max_tokens: int) -> list[list[int]]:
    """Consecutive row indices grouped while (rows x widest row) <= max_tokens; a row wider than the budget
    is a batch of its own. Padding is what the budget counts: every row is padded to the widest."""
    batches: list[list[int]] = []
    longest = 0
    for r, width in enumerate(widths):
        n = int(width)
        if batches and (len(batches[-1]) + 1) * max(longest, n) <= max_tokens:
            batches[-1].append(r)
            longest = max(longest, n)
        else:
            batches.append([r])
            longest = n
    return batches


def batches_longest_first(widths: Sequence[int] | np.ndarray, max_tokens: int) -> list[list[int]]:
    """`batch_rows` over the rows sorted widest first (so rows of similar width share a batch and pad
    little); returns indices into `widths`."""
    order = decreasing_order(widths)
    return [[order[i] for i in batch] for batch in batch_rows([widths[o] for o in order], max_tokens)]


def fill_row(length_at: Callable[[int], int], count: int, cursor: int, offset: int,
             need: int) -> tuple[list[Piece], int, int] | None:
    """Plan one row of `need` tokens from a sequence of `count` documents, starting at token `offset` of
    document `cursor`: -> (pieces, next cursor, next offset), or None when the sequence ends first (an
    incomplete row consumes nothing).

    Documents are taken in order and a document cut by the row's end continues in the next row. The cut
    document resumes at the row's last token, which was only a label here; a row that ends exactly at a
    document's end needs no overlap. `length_at(i)` is the token count of the i-th document.
    """
    pieces: list[Piece] = []
    filled = 0
    while filled < need:
        if cursor >= count:
            return None
        length = length_at(cursor)
        take = min(length - offset, need - filled)
        pieces.append((cursor, offset, take))
        filled += take
        if offset + take == length:
            cursor, offset = cursor + 1, 0
        else:
            offset += take
    if offset:
        offset -= 1
    return pieces, cursor, offset
