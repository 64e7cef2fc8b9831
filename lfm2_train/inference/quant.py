"""Weight-only int8 for CPU decode: per-output-channel symmetric scales, `aten._weight_int8pack_mm` kernel.

Decode on CPU is bound by the bytes of weights streamed per token, so storing weights as int8 (a quarter of
fp32, half of bf16) is the largest single speed-up available through stock torch. Activations stay in a
float dtype; only the matrix operand is quantized, with one scale per output row, so the error is the
rounding of each weight to 1/127 of its row's largest magnitude.
"""

from __future__ import annotations

import torch

from . import native

# Rows above this count go through a dequantized fp32 GEMM instead (prefill). Below it, the native kernel
# (fp32 activations) or `_weight_int8pack_mm`, which is fast only for bf16 activations on CPU (fp32 inputs
# take a scalar path that streams ~1 GB/s here), so activations are rounded to bf16 for it.
INT8_MATVEC_MAX_ROWS = 16


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scales (N,)) with `weight ≈ q * scale[:, None]`."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_rowwise expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear:
    """`y = x @ (q * scale).T` without materialising the float weight on the decode path."""

    def __init__(self, weight: torch.Tensor, use_native: bool = False) -> None:
        self.q, self.scale = quantize_rowwise(weight)
        self.scale_bf16 = self.scale.to(torch.bfloat16)
        self.out_features, self.in_features = self.q.shape
        self.gemv = native.Gemv(self.q, self.scale) if use_native else None

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] <= INT8_MATVEC_MAX_ROWS and self.gemv is not None:
            y = self.gemv(flat)
        elif flat.shape[0] <= INT8_MATVEC_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.q, self.scale_bf16)
        else:  # prefill: one dequantize per matrix is cheap next to an (M, K) x (K, N) GEMM
            y = native.gemm(flat.float(), self.dequantize())
        return y.to(x.dtype).view(*shape[:-1], self.out_features)
