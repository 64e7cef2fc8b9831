"""Packed SFT rows: whole conversations side by side, each its own document, labels only where the
assistant speaks.

A conversation of L tokens takes L - 1 positions of a row: inputs `ids[:-1]`, targets `labels[1:]`
(the chat labels are unshifted, see `data/chat.py`). Conversations are placed whole and in the given
order (so a curriculum order is kept exactly); when the next one does not fit, the row is padded (doc id
-1, no labels) and the conversation starts the next row. Nothing is ever split across rows, so every
assistant token sees its whole context, and `doc_ids` keep attention and the convolution inside each
conversation. The resume state is two integers, like `DocumentStream`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .chat import EncodedChat
from .packed import IGNORE_INDEX


@dataclass
class SFTStreamState:
    cursor: int = 0  # next position in the example sequence
    rows: int = 0  # rows produced so far

    def to_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "rows": self.rows}


def positions_needed(example: EncodedChat) -> int:
    """Row positions a conversation occupies (one per next-token prediction)."""
    return len(example.input_ids) - 1


def count_rows(lengths: Sequence[int] | np.ndarray, seq_len: int) -> int:
    """How many full rows greedy in-order packing makes from examples of these position counts."""
    rows, used = 0, 0
    for n in lengths:
        n = int(n)
        if used + n > seq_len:
            rows, used = rows + 1, 0
        used += n
    return rows + int(used > 0)


class SFTStream:
    """Packs `examples[sequence[0]], examples[sequence[1]], ...` into rows of `seq_len` positions."""

    def __init__(self, examples: Sequence[EncodedChat], sequence: Sequence[int] | np.ndarray, seq_len: int,
                 pad_id: int = 0) -> None:
        if len(sequence) == 0:
            raise ValueError("the SFT example sequence is empty: nothing to train on")
        for i in np.unique(np.asarray(sequence)):
            n = positions_needed(examples[int(i)])
            if n < 1 or n > seq_len:
                raise ValueError(f"SFT example {int(i)} needs {n} positions; each must need 1..seq_len={seq_len}")
        self.examples = examples
        self.sequence = np.asarray(sequence, dtype=np.int64)
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.state = SFTStreamState()

    def load_state(self, state: dict[str, int]) -> None:
        self.state = SFTStreamState(**state)

    def _fill_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The next row, or None when the sequence is spent (the last row may be part padding)."""
        ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        docs = np.full(self.seq_len, -1, dtype=np.int64)
        st, used, segment = self.state, 0, 0
        while st.cursor < len(self.sequence):
            ex = self.examples[int(self.sequence[st.cursor])]
            n = positions_needed(ex)
            if used + n > self.seq_len:
                break
            ids[used:used + n] = ex.input_ids[:-1]
            labels[used:used + n] = ex.labels[1:]
            docs[used:used + n] = segment
            used, segment, st.cursor = used + n, segment + 1, st.cursor + 1
        if used == 0:
            return None
        st.rows += 1
        return ids, labels, docs

    @staticmethod
    def _collate(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(np.stack([r[0] for r in rows])),  # (B, T)
                "labels": torch.from_numpy(np.stack([r[1] for r in rows])),  # (B, T)
                "doc_ids": torch.from_numpy(np.stack([r[2] for r in rows]))}  # (B, T), -1 = padding

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """-> input_ids, labels, doc_ids, each (B, seq_len) int64. StopIteration when the sequence is spent;
        an incomplete batch consumes nothing."""
        saved = SFTStreamState(**self.state.to_dict())
        rows = []
        for _ in range(batch_size):
            row = self._fill_row()
            if row is None:
                self.state = saved
                raise StopIteration
            rows.append(row)
        return self._collate(rows)

    def next_local_batch(self, global_rows: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """Rank `rank`'s rows of the next global batch, packing only those: the other rows are stepped over
        with the examples' lengths. Every rank ends in the state `next_batch(global_rows)` leaves."""
        if global_rows % world_size:
            raise ValueError(f"{global_rows} rows do not split evenly over {world_size} ranks")
        b = global_rows // world_size
        saved = SFTStreamState(**self.state.to_dict())
        rows = []
        for i in range(global_rows):
            row = self._fill_row() if rank * b <= i < (rank + 1) * b else self._skip_row()
            if row is None:
                self.state = saved
                raise StopIteration
            if rank * b <= i < (rank + 1) * b:
                rows.append(row)
        return self._collate(rows)

    def _skip_row(self) -> bool | None:
        """`_fill_row`'s state transitions from the examples' lengths alone; None when the sequence is spent."""
        st, used = self.state, 0
        while st.cursor < len(self.sequence):
            n = positions_needed(self.examples[int(self.sequence[st.cursor])])
            if used + n > self.seq_len:
                break
            used, st.cursor = used + n, st.cursor + 1
        if used == 0:
            return None
        st.rows += 1
        return True

    def drain(self, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Every remaining example as batches (for validation), the last batch possibly smaller."""
        rows = []
        while (row := self._fill_row()) is not None:
            rows.append(row)
        return [self._collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
