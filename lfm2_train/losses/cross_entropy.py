"""Next-token cross-entropy fused with the LM head, computed chunk by chunk over positions.

Full logits for a batch are (positions x vocab) fp32 — 1 GiB for 4K positions at V = 65,536, twice that
with their gradient. Here the head, the loss and *their gradients* are computed one chunk at a time in
the forward pass (the gradient of a sum of cross-entropies w.r.t. the logits is softmax - onehot, known
as soon as the logits are), so at most one chunk of fp32 logits ever exists and no logits are kept for
the backward. The matmul count equals the unfused version's (one forward, two gradient products): no
recomputation.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from ..data.packed import IGNORE_INDEX


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(h, weight).float()  # (n, V) fp32, as transformers upcasts before the loss


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], labels[start:start + chunk_size]
            logits = _chunk_logits(hc, weight)
            valid = yc != IGNORE_INDEX
            safe = torch.where(valid, yc, torch.zeros_like(yc))
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe[:, None])[:, 0]
            total += ((lse - target) * valid).sum()
            if need_h or need_w:
                g = torch.exp(logits - lse[:, None])  # softmax, in place of the logits' memory
                g[torch.arange(len(yc), device=g.device), safe] -= 1.0
                g *= valid[:, None]
                if need_h:
                    grad_h[start:start + chunk_size] = (g @ weight.float()).to(h.dtype)
                if need_w:
                    grad_w.addmm_(g.t(), hc.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def chunked_cross_entropy(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (..., d), head (V, d), labels (...) -> (sum of token losses in fp32, number of labelled tokens)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    n_tokens = (y != IGNORE_INDEX).sum()
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, head_weight, y, chunk_size), n_tokens
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        logits = _chunk_logits(h[start:start + chunk_size], head_weight)
        total = total + F.cross_entropy(logits, y[start:start + chunk_size], ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total, n_tokens


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int = 2048
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM loss of a (possibly wrapped) `LFM2ForCausalLM` on a packed batch -> (loss sum, tokens)."""
    head = partial(chunked_cross_entropy, labels=batch["labels"], chunk_size=chunk_size)
    return model(batch["input_ids"], doc_ids=batch.get("doc_ids"), head_fn=head)
