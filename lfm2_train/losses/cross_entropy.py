"""Next-token cross-entropy through the fused, chunked LM head (see `head.py` for why)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .head import fused_head_loss
from .labels import IGNORE_INDEX


def ce_chunk(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum"), {}


def chunked_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (..., d), head (V, d), labels (...) -> (sum of token losses in fp32, number of labelled tokens)."""
    loss, _ = fused_head_loss(hidden, head_weight, ce_chunk, [labels], chunk_size)
    return loss, (labels != IGNORE_INDEX).sum()


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM loss of a (possibly wrapped) `LFM2ForCausalLM` on a packed batch -> (loss sum, tokens)."""
    head = partial(chunked_cross_entropy, labels=batch["labels"], chunk_size=chunk_size)
    return model(batch["input_ids"], doc_ids=batch.get("doc_ids"), head_fn=head)
