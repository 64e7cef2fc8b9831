"""Losses on the LM head's output, computed chunk by chunk with their gradients in the forward pass.

Logits for a batch are (positions x vocab) fp32: 4 GiB for 8x2048 positions at V = 65,536, and autograd
keeps several such buffers (logits, softmax, their gradients). `fused_head_loss` instead takes one chunk
of positions at a time, computes the logits, the loss and d(loss)/d(logits) with a local autograd call,
immediately turns that into gradients for the hidden states and the head weight, and frees the chunk.
So at most one chunk-sized group of fp32 [chunk, vocab] buffers is alive, and nothing of the logits is
kept for the backward. The matmul count equals the unfused version's (no recomputation).

A `ChunkLoss` is a function `(logits (n, V) fp32, *chunk inputs) -> (loss sum, {metric: sum})`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

ChunkLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def default_chunk_size(vocab: int, budget_mib: int = 256) -> int:
    """Positions per chunk so one fp32 [chunk, vocab] buffer stays within `budget_mib`."""
    return max(16, (budget_mib << 20) // (4 * vocab))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for training dtypes (bf16/fp16/fp32); fp64 stays fp64 (reference tests)."""
    return torch.promote_types(t.dtype, torch.float32)


def _logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = F.linear(h, weight)  # (n, V)
    return out.to(_acc_dtype(out))  # upcast before the loss, as transformers does


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, chunk_size, fn, n_inputs, *inputs):  # type: ignore[override]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        acc = _acc_dtype(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        w32 = weight.to(acc) if need_h else None
        for start in range(0, h.shape[0], chunk_size):
            hc = h[start:start + chunk_size]
            chunk_inputs = [x[start:start + chunk_size] for x in inputs]
            with torch.enable_grad():
                logits = _logits(hc, weight).detach().requires_grad_(need_h or need_w)
                loss, _ = fn(logits, *chunk_inputs)  # metric sums reach the caller through _capture
                if need_h or need_w:
                    (g,) = torch.autograd.grad(loss, logits)
            total += loss.detach()
            if need_h:
                grad_h[start:start + chunk_size] = (g.to(acc) @ w32).to(h.dtype)
            if need_w:
                grad_w.addmm_(g.t().to(acc), hc.to(acc))
            del logits
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.n_inputs = n_inputs
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return (dh, dw, None, None, None, *([None] * ctx.n_inputs))


def fused_head_loss(hidden: torch.Tensor, head_weight: torch.Tensor, fn: ChunkLoss, inputs: Sequence[torch.Tensor],
                    chunk_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over positions of `fn` on the head's logits. hidden (..., d); each input (..., *) aligned with it.

    Returns (loss sum, metric sums). Gradients flow to `hidden` and `head_weight` only.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    flat = [x.reshape(h.shape[0], *x.shape[hidden.dim() - 1:]).to(h.device) for x in inputs]
    chunk = chunk_size or default_chunk_size(head_weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        metrics: dict[str, torch.Tensor] = {}
        total = _FusedHeadLoss.apply(h, head_weight, chunk, _capture(fn, metrics), len(flat), *flat)
        return total, metrics
    total = torch.zeros((), dtype=_acc_dtype(h), device=h.device)
    metrics: dict[str, torch.Tensor] = {}
    for start in range(0, h.shape[0], chunk):
        loss, m = fn(_logits(h[start:start + chunk], head_weight), *[x[start:start + chunk] for x in flat])
        total = total + loss
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v
    return total, metrics


def _capture(fn: ChunkLoss, sink: dict[str, torch.Tensor]) -> ChunkLoss:
    """Wrap `fn` so the metric sums computed inside the autograd Function reach the caller."""

    def wrapped(logits: torch.Tensor, *args: torch.Tensor):
        loss, m = fn(logits, *args)
        for k, v in m.items():
            sink[k] = sink.get(k, 0.0) + v.detach()
        return loss, m

    return wrapped
