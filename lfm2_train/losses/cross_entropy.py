"""Next-token cross-entropy computed from hidden states in chunks of positions.

Full logits for a batch are (positions x vocab) fp32 — 1 GiB for 4K positions at V = 65,536. Computing the
head and the loss chunk by chunk under activation checkpointing keeps at most one chunk of fp32 logits
alive, in the forward and in the backward.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..data.packed import IGNORE_INDEX


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (..., d), labels (...) -> (sum of token losses in fp32, number of labelled tokens)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
            total = total + checkpoint(_chunk_loss, hc, head_weight, yc, use_reentrant=False)
        else:
            total = total + _chunk_loss(hc, head_weight, yc)
    return total, (y != IGNORE_INDEX).sum()


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 4096
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM loss of a (possibly wrapped) `LFM2ForCausalLM` on a packed batch -> (loss sum, tokens)."""
    head = partial(chunked_cross_entropy, labels=batch["labels"], chunk_size=chunk_size)
    return model(batch["input_ids"], doc_ids=batch.get("doc_ids"), head_fn=head)
