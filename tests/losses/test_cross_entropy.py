"""The fused chunked LM-head cross-entropy against a naive float64 reference (value and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lfm2_train.losses import chunked_cross_entropy, lm_loss
from lfm2_train.model import LFM2ForCausalLM, get_preset


def _reference(h, w, y):
    logits = (h.double() @ w.double().t())
    return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_value_and_gradients_match_float64(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (50,))
    y[[0, 13, 49]] = -100
    loss, n = chunked_cross_entropy(h, w, y, chunk_size=chunk)
    (loss * 0.37).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _reference(h64, w64, y)
    (ref * 0.37).backward()
    assert n == 47
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(h.grad.double(), h64.grad, atol=1e-6)
    assert torch.allclose(w.grad.double(), w64.grad, atol=1e-6)


def test_no_grad_path_and_all_ignored():
    h, w = torch.randn(8, 4), torch.randn(10, 4)
    y = torch.full((8,), -100)
    with torch.no_grad():
        loss, n = chunked_cross_entropy(h, w, y, chunk_size=3)
    assert loss.item() == 0.0 and n == 0
    y[2] = 5
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(h, w, y, chunk_size=3)
    assert loss.item() == pytest.approx(_reference(h, w, y).item(), rel=1e-6)


def test_lm_loss_equals_full_logits_loss_on_the_model():
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny"))
    ids = torch.randint(0, 512, (2, 12))
    labels = torch.randint(0, 512, (2, 12))
    labels[0, :3] = -100
    loss, n = lm_loss(model, {"input_ids": ids, "labels": labels}, chunk_size=5)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    ref = F.cross_entropy(model(ids).flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and n == 21
    for k, p in model.named_parameters():
        assert torch.allclose(grads[k], p.grad, atol=1e-5), k
