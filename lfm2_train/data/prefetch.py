"""This rank's rows of each global batch, prepared one step ahead on a background thread.

`RankBatches` wraps any batch source. It asks the source for this rank's share of every global micro-batch
(`next_local_batch(global_rows, rank, world_size)` when the source can read only its own rows, else the
whole batch sliced), so the global order stays a function of the seed and the curriculum alone and the
numbers do not depend on the number of processes. With `prefetch > 0` a producer thread keeps that many
batches ready, so packing (and whatever the source does per batch, such as the teacher-cache gather of
distillation) overlaps the previous step instead of stalling it.

Resume: next to every batch the producer records the source's state right after making it; `state` is the
record of the last batch handed to the trainer, not of the ones still waiting in the queue, so a checkpoint
resumes exactly after the last batch that was trained on.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


def snapshot_state(state: Any) -> Any:
    """A detached, JSON-friendly copy of a source's state (`to_dict()` when it has one)."""
    return state.to_dict() if hasattr(state, "to_dict") else copy.deepcopy(state)


def local_rows(source: Any, global_rows: int, rank: int, world_size: int) -> Batch:
    """This rank's rows of the next global batch of `source`."""
    if hasattr(source, "next_local_batch"):
        return source.next_local_batch(global_rows, rank, world_size)
    batch = source.next_batch(global_rows)
    b = global_rows // world_size
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


class RankBatches:
    """A batch source whose `next_batch(global_rows)` returns this rank's rows, optionally prefetched."""

    def __init__(self, source: Any, rank: int = 0, world_size: int = 1, prefetch: int = 1) -> None:
        self.source = source
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self._state = snapshot_state(source.state)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._rows: int | None = None

    # -------------------------------------------------------------------------------------- the protocol
    def __getattr__(self, name: str) -> Any:
        """The wrapped source's optional hooks (`normaliser`, `tokens`: what the trainer divides the loss by and
        counts as tokens) read this rank's batch, so they pass straight through."""
        if name in ("normaliser", "tokens"):
            return getattr(self.source, name)
        raise AttributeError(name)

    @property
    def state(self) -> Any:
        return self._state

    def load_state(self, state: Any) -> None:
        self.close()
        self.source.load_state(state)
        self._state = snapshot_state(self.source.state)

    def next_batch(self, global_rows: int) -> Batch:
        if self.prefetch <= 0:
            batch = local_rows(self.source, global_rows, self.rank, self.world_size)
            self._state = snapshot_state(self.source.state)
            return batch
        if self._thread is None:
            self._start(global_rows)
        elif global_rows != self._rows:
            raise ValueError(f"prefetching {self._rows} rows per batch, asked for {global_rows}")
        kind, payload, state = self._queue.get()
        if kind == "error":
            self._thread.join()
            self._thread = None  # the producer stopped at the error; a retry asks the source again
            raise payload
        self._state = state
        return payload

    def close(self) -> None:
        """Stop the producer and forget prepared batches (the source rewinds through `load_state`)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread, self._queue = None, None
        self._stop.clear()
        # Batches made but not consumed moved the source on: put it back where the consumer stands.
        self.source.load_state(copy.deepcopy(self._state))

    # -------------------------------------------------------------------------------------- the producer
    def _start(self, global_rows: int) -> None:
        self._rows = global_rows
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, args=(global_rows,), name="batch-prefetch",
                                        daemon=True)
        self._thread.start()

    def _produce(self, global_rows: int) -> None:
        while not self._stop.is_set():
            try:
                batch = local_rows(self.source, global_rows, self.rank, self.world_size)
                item = ("batch", batch, snapshot_state(self.source.state))
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                item = ("error", err, None)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return
