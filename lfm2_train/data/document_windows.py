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
