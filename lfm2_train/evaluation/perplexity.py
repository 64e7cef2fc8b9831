"""Validation loss / perplexity on token shards, on exactly the documents training held out.

The held-out documents come from the same `split_documents` call the pretrain stage makes (same
fraction, cap and seed), so a number here is comparable with the `val_loss` a training run logged,
except that here every held-out document is measured rather than the first `trainer.eval_batches`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..data.format import DataFormatError, ShardReader, check_compatible, load_manifest
from ..data.packed import DocumentStream, split_documents
from ..losses import lm_loss
from ..model import LFM2ForCausalLM
from .runner import _eval_mode


def validation_documents(dataset_dir: str | Path, max_documents: int = 256, seed: int = 1234,
                         val_fraction: float = 0.02) -> tuple[ShardReader, Any]:
    """(reader, held-out document indices) as the pretrain stage splits them (`data.val_fraction`,
    `data.val_max_documents`, `data.seed`)."""
    manifest = load_manifest(dataset_dir)
    reader = ShardReader(dataset_dir, manifest)
    if len(reader) < 2:
        raise DataFormatError(f"{dataset_dir} holds {len(reader)} document(s): no held-out split is possible")
    _, val_docs = split_documents(len(reader), val_fraction, max_documents, seed)
    if len(val_docs) == 0:
        raise DataFormatError(f"{dataset_dir}: the validation split is empty (val_fraction={val_fraction})")
    return reader, val_docs


@torch.no_grad()
def validation_loss(model: LFM2ForCausalLM, dataset_dir: str | Path, seq_len: int = 256, max_documents: int = 256,
                    batch_size: int = 8, seed: int = 1234, val_fraction: float = 0.02) -> dict[str, float]:
    """-> {"loss": mean per-token cross-entropy (nats), "ppl": exp(loss), "tokens": labelled tokens}."""
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    reader, val_docs = validation_documents(dataset_dir, max_documents, seed, val_fraction)
    check_compatible(reader.manifest, tokenizer_fingerprint=None, vocab_size=model.config.vocab_size,
                     source=str(dataset_dir))
    batches = DocumentStream(reader, val_docs, seq_len).drain(batch_size)
    device = model.model.embed_tokens.weight.device
    total, count = 0.0, 0
    with _eval_mode(model):
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = lm_loss(model, batch)
            total += float(loss)
            count += int(n)
    if count == 0:
        raise DataFormatError(f"{dataset_dir}: the validation documents hold no labelled tokens")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
