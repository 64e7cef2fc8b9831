"""A bigram "model" whose next-token logits are a table we write by hand, so expected generations,
log-likelihoods and accuracies can be computed on paper. It speaks the same interface the runner uses
(`config`, `model.embed_tokens`, `new_cache`, `forward(..., logits_to_keep, head_fn)`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lfm2_train.model import get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


class _Embed(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, 1)


class BigramLM(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: the next token depends only on the current one."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.config = get_preset("tiny")
        self.table = table.float()  # (V, V)
        self.model = _Embed(table.shape[0])

    def new_cache(self, batch_size: int, max_length: int, dtype=None):
        return None

    def forward(self, input_ids, *, position_ids=None, doc_ids=None, attention_mask=None, cache=None,
                logits_to_keep=0, head_fn=None):
        logits = self.table[input_ids]  # (B, T, V)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if head_fn is not None:
            return head_fn(logits, torch.eye(logits.shape[-1]))
        return logits


@pytest.fixture(scope="session")
def tokenizer() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


@pytest.fixture
def bigram():
    """bigram(chain={a: b, ...}, default=token) -> BigramLM preferring b after a (logit 10), else `default`."""

    def make(chain: dict[int, int], default: int, vocab: int = 512) -> BigramLM:
        table = torch.zeros(vocab, vocab)
        table[:, default] = 10.0
        for a, b in chain.items():
            table[a] = 0.0
            table[a, b] = 10.0
        return BigramLM(table)

    return make
