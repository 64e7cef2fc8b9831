"""Preallocated inference state: KV for attention layers, a (k-1)-token window for conv layers.

Everything is allocated once for `max_length` tokens, so decode does no per-token allocation and no
Python-side list bookkeeping: a step writes one column of K/V and shifts a 2-column conv window.
The conv state is what makes LFM2 cheap on CPU: it is O(1) in the context length.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ATTENTION, LFM2Config


class InferenceCache:
    def __init__(
        self,
        config: LFM2Config,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0  # tokens already written (the same for every row; padding is masked)
        G, D, d, k = config.num_key_value_heads, config.head_size, config.hidden_size, config.conv_L_cache
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv: dict[int, torch.Tensor] = {}
        for i, kind in enumerate(config.layer_types):
            if kind == ATTENTION:
                self.keys[i] = torch.zeros(batch_size, G, max_length, D, dtype=dtype, device=device)
                self.values[i] = torch.zeros(batch_size, G, max_length, D, dtype=dtype, device=device)
            else:
                self.conv[i] = torch.zeros(batch_size, d, k - 1, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        self.has_padding = False
        # Next RoPE position per row (rows of a left-padded batch start at different offsets).
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)

    def reserve(self, n_tokens: int) -> None:
        if self.length + n_tokens > self.max_length:
            raise ValueError(
                f"InferenceCache holds {self.max_length} tokens; {self.length} used, {n_tokens} more requested"
            )

    def write_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, G, T, D) at the current offset; return views of all keys/values so far."""
        T = k.shape[2]
        end = self.length + T
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n_tokens: int, valid: torch.Tensor | None) -> None:
        """Called once per forward, after all layers wrote: move the offset and the row positions."""
        if valid is not None:
            self.key_valid[:, self.length:self.length + n_tokens] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
            self.next_position += valid.sum(dim=1)
        else:
            self.next_position += n_tokens
        self.length += n_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only / reorder rows (e.g. drop finished sequences from a batch)."""
        reorder_rows(self, index)


def reorder_rows(state: InferenceCache | Any, index: torch.Tensor) -> None:
    """Keep only / reorder the rows of any per-row decode state with `keys`, `values`, `conv` (layer -> tensor
    with the batch first), `key_valid` and `next_position` — this cache and the fast path's `FastState`."""
    for store in (state.keys, state.values, state.conv):
        for i in store:
            store[i] = store[i].index_select(0, index)
    state.key_valid = state.key_valid.index_select(0, index)
    state.next_position = state.next_position.index_select(0, index)
    state.batch_size = int(index.numel())
