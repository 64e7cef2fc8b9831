"""Which tokens may see which: documents packed in a row, left padding, and the decode cache.

Both mixers need the same fact — "token t and token s belong to the same document" — attention for its
mask and the short convolution for its k-1 tokens of history. Computing it once per forward, here, is
what keeps packed training from leaking conv state across documents (the bug public LFM2 trainers
shipped with) and makes a left-padded row compute exactly what the unpadded prompt computes.

Conventions: `doc_ids` is (B, T) with one integer per document; padding is any negative id. Positions
restart at 0 in every document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def doc_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """A new document starts wherever the position does not continue the previous one (B, T) -> (B, T)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(dim=1) - 1


def position_ids_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at every document boundary (padding gets 0)."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return torch.where(doc_ids >= 0, idx - start_idx, torch.zeros_like(idx))


@dataclass
class BatchLayout:
    """Per-forward description of the batch, built once by the model and read by every layer.

    `doc_ids is None` is the fast path: one document per row, no padding (plain causal attention and
    a plain causal conv). `past_length` > 0 means a decode cache holds earlier tokens.
    """

    position_ids: torch.Tensor  # (B, T)
    doc_ids: torch.Tensor | None = None  # (B, T); negative = padding
    past_length: int = 0
    key_valid: torch.Tensor | None = None  # (B, past + T) keys that are real tokens (cache + padding)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.position_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.position_ids.shape[1]

    @property
    def is_simple(self) -> bool:
        return self.doc_ids is None and self.key_valid is None

    # ---------------------------------------------------------------- conv
    def conv_history_masks(self, kernel: int) -> list[torch.Tensor] | None:
        """For lag l = 1..kernel-1, a (B, T, 1) bool mask: True where token t-l is in t's document.

        None on the fast path. Tokens before the start of this forward are history from the cache
        (already zero for padding), so they are allowed.
        """
        if self.doc_ids is None:
            return None
        key = ("conv", kernel)
        if key not in self._cache:
            doc = self.doc_ids
            masks = []
            for lag in range(1, kernel):
                same = torch.ones_like(doc, dtype=torch.bool)
                same[:, lag:] = doc[:, lag:] == doc[:, :-lag]
                if self.past_length == 0:
                    same[:, :lag] = False  # zero history at the start of the sequence
                masks.append(same[:, :, None])
            self._cache[key] = masks
        return self._cache[key]

    def valid_tokens(self) -> torch.Tensor | None:
        """(B, T, 1) bool mask of real (non-padding) tokens, or None when there is no padding."""
        if self.doc_ids is None:
            return None
        key = "valid"
        if key not in self._cache:
            self._cache[key] = (self.doc_ids >= 0)[:, :, None]
        return self._cache[key]

    # ---------------------------------------------------------------- attention
    def attention_mask(self) -> torch.Tensor | None:
        """Boolean (B, 1, T, past + T) mask, True = may attend; None when plain causal suffices.

        A padded query may always see itself, so no softmax row is empty (no NaN anywhere).
        """
        if self.is_simple and (self.past_length == 0 or self.seq_len == 1):
            return None
        if "attn" in self._cache:
            return self._cache["attn"]
        T, P = self.seq_len, self.past_length
        dev = self.position_ids.device
        q_pos = torch.arange(P, P + T, device=dev)
        k_pos = torch.arange(P + T, device=dev)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, T, P+T)
        if self.doc_ids is not None:
            if P:
                raise ValueError("packed documents (doc_ids) cannot be combined with a decode cache")
            same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, T)
            allowed = allowed & same
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, None, :]
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None]
        mask = allowed[:, None]
        self._cache["attn"] = mask
        return mask

    def needs_causal_only(self) -> bool:
        """True when SDPA's own `is_causal` (top-left aligned) is exactly right."""
        return self.is_simple and self.past_length == 0

    def varlen(self) -> tuple[torch.Tensor, int]:
        """Flattened segment boundaries for flash-attn's varlen kernel: (cu_seqlens int32, max_seqlen).

        Padding runs become segments of their own (they see only padding), so real tokens are exact.
        """
        if "varlen" not in self._cache:
            B, T = self.position_ids.shape
            dev = self.position_ids.device
            if self.doc_ids is None:
                lengths = torch.full((B,), T, device=dev, dtype=torch.int32)
            else:
                starts = torch.ones_like(self.doc_ids, dtype=torch.bool)
                starts[:, 1:] = self.doc_ids[:, 1:] != self.doc_ids[:, :-1]
                flat_starts = starts.flatten().nonzero().flatten()
                ends = torch.cat([flat_starts[1:], torch.tensor([B * T], device=dev)])
                lengths = (ends - flat_starts).to(torch.int32)
            cu = torch.zeros(lengths.numel() + 1, device=dev, dtype=torch.int32)
            cu[1:] = lengths.cumsum(0)
            self._cache["varlen"] = (cu, int(lengths.max().item()))
        return self._cache["varlen"]
