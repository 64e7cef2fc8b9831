"""Documents cut into windows a model of bounded length can read, and windows packed into rows and rows into
batches — deterministically, so a resumed pass over a block computes exactly the same batches.

A document longer than `max_length` is processed in windows: the first covers tokens [0, max_length); each
next window restarts the context `overlap` tokens before the first row it emits, so every emitted row sees
at least `overlap` tokens of its document (0 = non-overlapping restarts). Windows are packed into rows of
at most `max_length` tokens (several documents per row, kept apart with `doc_ids`), and rows into batches
of at most `max_tokens` tokens.
"""

from __future__ import annotations


def document_windows(length: int, max_length: int, overlap: int) -> list[tuple[int, int, int]]:
    """(context start, first emitted row, end) of each window of a document of `length` tokens.

    Rows [emit, end) of the document are computed from tokens [start, end). Windows after the first start
    `overlap` tokens before their first row, so no row is predicted from (almost) no context, at a compute
    cost of max_length / (max_length - overlap) on long documents only.
    """
    if not 0 <= overlap < max_length:
        raise ValueError(f"window_overlap={overlap} must be in [0, max_length={max_length})")
    out, emit = [], 0
    while emit < length:
        start = 0 if emit == 0 else emit - overlap
        end = min(start + max_length, length)
        out.append((start, emit, end))
        emit = end
    return out


def pack_segments(lengths: list[int], capacity: int, pack: bool) -> list[list[int]]:
    """Rows of segment indices: first-fit decreasing into rows of `capacity` tokens (one per row unless `pack`).

    Deterministic in its input, which is what makes a resumed block compute exactly the same batches.
    """
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


def group_rows(row_lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Batches of row indices such that (rows x longest row) <= max_tokens (at least one row each)."""
    order = sorted(range(len(row_lengths)), key=lambda r: (-row_lengths[r], r))
    batches: list[list[int]] = []
    for r in order:
        if batches and (len(batches[-1]) + 1) * row_lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(r)
        else:
            batches.append([r])
    return batches
