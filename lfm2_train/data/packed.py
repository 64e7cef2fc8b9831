"""Fixed-length packed rows from a document sequence, with document ids and an exact resume state.

Documents are read in a given order (curriculum, paced, or a seeded shuffle) and concatenated into rows
of `seq_len + 1` tokens; a document that does not fit continues at the start of the next row (as a new
segment: positions restart, nothing is attended across rows). Labels that would predict the first token
of the next document from the previous one's separator are masked, so packing never teaches the model
that unrelated documents follow each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..losses.labels import IGNORE_INDEX
from .format import ShardReader
from .packing import Piece, fill_row


@dataclass
class PackerState:
    """Where the stream stands: the next document in the sequence and the offset inside it."""

    cursor: int = 0
    offset: int = 0
    rows: int = 0  # rows produced so far (for logging and sanity checks)

    def to_dict(self) -> dict[str, int]:
        return {"cursor": self.cursor, "offset": self.offset, "rows": self.rows}


class DocumentStream:
    """Packs documents `sequence[0], sequence[1], ...` (global indices into `reader`) into rows."""

    def __init__(self, reader: ShardReader, sequence: np.ndarray, seq_len: int) -> None:
        if len(sequence) == 0:
            raise ValueError("the document sequence is empty: nothing to train on")
        self.reader = reader
        self.sequence = np.asarray(sequence, dtype=np.int64)
        self.seq_len = seq_len
        self.state = PackerState()
        self._lengths: np.ndarray | None = None  # document lengths, read on the first row

    def load_state(self, state: dict[str, int]) -> None:
        self.state = PackerState(**state)

    def _document_length(self, position: int) -> int:
        """Token count of the document at `position` of the sequence (lengths are read once, on first use)."""
        if self._lengths is None:
            self._lengths = self.reader.doc_lengths()
        return int(self._lengths[self.sequence[position]])

    def _plan_row(self) -> list[Piece]:
        """Advance the state past the next row and return its pieces; StopIteration (state untouched) when
        the sequence cannot fill another row."""
        st = self.state
        plan = fill_row(self._document_length, len(self.sequence), st.cursor, st.offset, self.seq_len + 1)
        if plan is None:
            raise StopIteration
        pieces, st.cursor, st.offset = plan
        st.rows += 1
        return pieces

    def _next_row(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        need = self.seq_len + 1
        tokens = np.empty(need, dtype=np.int64)
        docs = np.empty(need, dtype=np.int64)
        where = np.empty(need, dtype=np.int64)  # global token index (aligns teacher caches)
        filled = 0
        for segment, (position, start, take) in enumerate(self._plan_row()):
            doc_index = int(self.sequence[position])
            tokens[filled:filled + take] = self.reader.document(doc_index)[start:start + take]
            docs[filled:filled + take] = segment
            where[filled:filled + take] = self.reader.token_start(doc_index) + start + np.arange(take)
            filled += take
        return tokens, docs, where

    def drain(self, batch_size: int, pad_id: int = 0) -> list[dict[str, torch.Tensor]]:
        """Every remaining token as batches (for validation): the last row is padded (doc id -1, labels
        ignored), so small held-out sets are still measured in full."""
        batches, rows = [], []
        while True:
            try:
                rows.append(self._next_row())
            except StopIteration:
                break
        st = self.state
        if st.cursor < len(self.sequence):  # the tail that did not fill a row
            tokens, docs, where, seg = [], [], [], 0
            for i in range(st.cursor, len(self.sequence)):
                skip = st.offset if i == st.cursor else 0
                doc = self.reader.document(int(self.sequence[i]))[skip:]
                start = self.reader.token_start(int(self.sequence[i])) + skip
                tokens.extend(doc.tolist())
                docs.extend([seg] * len(doc))
                where.extend(range(start, start + len(doc)))
                seg += 1
            n = self.seq_len + 1 - len(tokens)
            if len(tokens) > 1:
                rows.append((np.array(tokens + [pad_id] * n), np.array(docs + [-1] * n), np.array(where + [-1] * n)))
            st.cursor = len(self.sequence)
        for i in range(0, len(rows), batch_size):
            batches.append(self._collate(rows[i:i + batch_size]))
        return batches

    @staticmethod
    def _collate(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(np.stack([r[0] for r in rows])).long()
        docs = torch.from_numpy(np.stack([r[1] for r in rows])).long()
        where = torch.from_numpy(np.stack([r[2] for r in rows])).long()
        labels = tokens[:, 1:].clone()
        # Never predict across a document boundary, and never predict padding.
        labels[(docs[:, 1:] != docs[:, :-1]) | (docs[:, 1:] < 0)] = IGNORE_INDEX
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels, "doc_ids": docs[:, :-1].contiguous(),
                "token_index": where[:, :-1].contiguous()}

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """-> input_ids, labels, doc_ids, each (B, seq_len) int64. Raises StopIteration when exhausted."""
        return self._collate([self._next_row() for _ in range(batch_size)])

    def next_local_batch(self, global_rows: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """Rank `rank`'s share (rows [rank * b, (rank + 1) * b), b = global_rows / world_size) of the next global
        batch, reading only those rows' tokens: the other rows are stepped over with document lengths alone.
        The stream ends in the same state on every rank, the state `next_batch(global_rows)` leaves."""
        if global_rows % world_size:
            raise ValueError(f"{global_rows} rows do not split evenly over {world_size} ranks")
        b = global_rows // world_size
        lo, hi = rank * b, (rank + 1) * b
        saved = PackerState(**self.state.to_dict())
        rows = []
        try:
            for i in range(global_rows):
                if lo <= i < hi:
                    rows.append(self._next_row())
                else:
                    self._skip_row()
        except StopIteration:
            self.state = saved  # an incomplete global batch consumes nothing, on every rank alike
            raise
        return self._collate(rows)

    def _skip_row(self) -> None:
        """`_next_row`'s state transition, planned from the document lengths without touching any token."""
        self._plan_row()


def split_documents(n_documents: int, val_fraction: float, val_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded held-out split -> (train doc indices in original order, val doc indices sorted)."""
    n_val = min(int(round(n_documents * val_fraction)), val_max, max(n_documents - 1, 0))
    if val_fraction > 0 and n_documents > 1:
        n_val = max(n_val, 1)
    rng = np.random.default_rng(seed)
    val = np.sort(rng.permutation(n_documents)[:n_val])
    train_mask = np.ones(n_documents, dtype=bool)
    train_mask[val] = False
    return np.flatnonzero(train_mask), val
