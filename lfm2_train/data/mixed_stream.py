"""A batch source that mixes a fixed fraction of pre-training rows into another source's batches.

Fine-tuning on a narrow task (chat arithmetic, say) overwrites a small model's language model; replaying some
pre-training text in every batch keeps it (the "mix_pretrain" of a SFT stage). The number of replayed rows in
batch i is floor((i+1)·B·p) - floor(i·B·p), so over any run the share is exactly p of the rows and the mix is a
pure function of the step — resumable from a three-field state like every other stream.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch


class _Stream(Protocol):
    state: Any

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...


_KEYS = ("input_ids", "labels", "doc_ids")  # what both kinds of rows carry (token_index is pre-training only)


class MixedStream:
    def __init__(self, primary: _Stream, replay: _Stream, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"the replayed fraction must be in [0, 1), got {fraction}")
        self.primary, self.replay, self.fraction = primary, replay, fraction
        self.batches = 0

    def replay_rows(self, batch_size: int, index: int) -> int:
        """Pre-training rows in batch `index` (0-based) of `batch_size` rows."""
        return math.floor((index + 1) * batch_size * self.fraction) - math.floor(index * batch_size * self.fraction)

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        """-> input_ids, labels, doc_ids (B, T): the primary rows first, then the replayed ones."""
        k = self.replay_rows(batch_size, self.batches)
        main = self.primary.next_batch(batch_size - k)
        if k:
            extra = self.replay.next_batch(k)
            main = {key: torch.cat([main[key], extra[key]]) for key in _KEYS}
        self.batches += 1
        return main

    @property
    def state(self) -> dict[str, Any]:
        return {"primary": _plain(self.primary.state), "replay": _plain(self.replay.state), "batches": self.batches}

    def load_state(self, state: dict[str, Any]) -> None:
        self.primary.load_state(state["primary"])
        self.replay.load_state(state["replay"])
        self.batches = int(state["batches"])


def _plain(state: Any) -> Any:
    return state.to_dict() if hasattr(state, "to_dict") else state
