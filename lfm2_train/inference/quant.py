"""Quantized projections for CPU decode: weight-only int8, W8A8 (int8 weights and activations) and q4_0.

Decode on CPU is bound by the bytes of weights streamed per token, so fewer bytes per weight is the largest
speed-up available, as long as the arithmetic per weight keeps up with memory. The three modes:

- `int8` (`Int8Linear`): weights int8 with one fp32 scale per output row, activations stay float; the
  decode kernel widens every weight to fp32 (1 byte per weight; prefill dequantizes for a GEMM).
- `w8a8` (`W8A8Linear`): the same weights; each row of activations is quantized to int8 with its own scale
  (d = amax / 127, round half to even), and the products are exact int32 dot products (VNNI / vpmaddubsw
  in `csrc/int8_gemv.c`), scaled by d * scale[n] at the end. Prefill runs the same integer product as a GEMM
  (`torch._int_mm`), so prefill and decode give bit-identical results.
- `q4_0` (`Q4Linear`): weights in blocks of 32 along K, each block d * (q - 8) with q in [0, 15] and one fp16
  d (llama.cpp's q4_0 values: d = (the block's largest-magnitude weight) / -8), 4.5 bits per weight;
  activations quantized per block of 32 for decode (llama.cpp's q8_0). Prefill multiplies the float
  activations with the dequantized weights (a few thousand rows at a time).

Prefill's GEMMs over dequantized weights (int8, q4_0) take bf16 operands on CPUs that multiply bf16 matrices
in hardware (`native.bf16_gemm_in_hardware`; about 3x the fp32 GEMM there) and fp32 elsewhere; the sums are
fp32 either way, and bf16 rounds the activations (2^-9) less than the weights are rounded.

The module-level functions are plain torch and are the references the native kernels are tested against;
`kernels="torch"` runs the modes through them (bit-identical for w8a8, within fp32 rounding for q4_0).

Error bounds (derived in tests/inference/test_quant.py, which asserts them; docs/INFERENCE.md), for one output
y = sum_k x_k w_k with weight scale s (per row or block) and activation scale d:
    w8a8:  |y_q - y| <= sum_k (|x_k| s/2 + |w_k| d/2 + s d/4)            (weights and activations rounded)
    q4_0:  |y_q - y| <= sum_k (|x_k| |s_b| + |w_k| d_b/2 + |s_b| d_b/2)  (weights: a whole step at the clamp)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import native, pages

QUANT_MODES = ("int8", "w8a8", "q4_0")
Q4_BLOCK = 32  # weights per q4_0 block (along K)
Q4_ROWS = 8  # rows per packed q4_0 group (the kernel reads 8 rows side by side)
# Rows above this count go through a GEMM instead of the matrix-vector kernels (prefill).
INT8_MATVEC_MAX_ROWS = 16
# Elements of dequantized weight materialised at once by the chunked prefill GEMM (64 MiB of fp32, in a
# buffer kept per thread).
DEQUANT_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------- int8 weights
def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scales (N,)) with `weight ≈ q * scale[:, None]`, |q| <= 127."""
    if weight.dim() != 2:
        raise ValueError(f"quantize_rowwise expects a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


# ---------------------------------------------------------------------------------------------- activations
def _quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: d = amax / 127, q = round(x / d) in [-127, 127] (d = 0: q = 0).

    The arithmetic is the kernels' exactly (fp32 division, round half to even), so results are bit-equal.
    """
    x = x.float()
    d = x.abs().amax(dim=-1) / 127.0
    div = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round(x / div[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, d


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's activations: (M, K) float -> (int8 (M, K), fp32 d (M,)), one scale per row (token)."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape, dtype=torch.int8), torch.zeros(x.shape[:-1])
    return _quantize_groups(x)


def quantize_activation_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_0's activations: (M, K) float -> (int8 (M, nb, 32), fp32 d (M, nb)), K zero-padded to nb * 32."""
    M, K = x.shape
    nb = -(-K // Q4_BLOCK)
    padded = F.pad(x.float(), (0, nb * Q4_BLOCK - K)).view(M, nb, Q4_BLOCK)
    return _quantize_groups(padded)


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether `torch._int_mm` returns exact int32 products here.

    Why ask: oneDNN's int8 GEMM on CPUs without VNNI adds 128 to one operand and uses vpmaddubsw, whose int16
    pairs saturate, so it returns wrong sums for large values (measured: errors of 1e5 on random int8 data
    with ONEDNN_MAX_CPU_ISA=AVX2). Random full-range data shows it at once.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (4, 2048), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (24, 2048), generator=g, dtype=torch.int8)
    try:
        got = torch._int_mm(a, b.t())
    except RuntimeError:
        return False
    return torch.equal(got.double(), a.double() @ b.double().t())


# Partial sums of int8 products stay below 2^24 (exact in fp32) for 1024 products: 1024 * 127^2 < 2^24.
_EXACT_FP32_TERMS = 1024


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact (M, K) int8 x (N, K) int8 -> (M, N) int32 (`a @ b.T`), entries in [-127, 127].

    `torch._int_mm` where it is exact; otherwise (and for K < 16) fp32 GEMMs over 1024-wide slices of K
    (every partial sum is an integer below 2^24, hence exact) summed in int64.
    """
    M, K = a.shape
    N = b.shape[0]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=torch.int32)
    if K >= 16 and int_mm_is_exact():  # torch 2.13's _int_mm returns wrong sums for K = 1; tiny K gains nothing
        return torch._int_mm(a, b.t())
    out = torch.zeros(M, N, dtype=torch.int64)
    for k in range(0, K, _EXACT_FP32_TERMS):
        sl = slice(k, k + _EXACT_FP32_TERMS)
        out += F.linear(a[:, sl].float(), b[:, sl].float()).to(torch.int64)
    return out.to(torch.int32)


def w8a8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The W8A8 product, (M, K) float -> (M, N) fp32: int8(x) @ q.T exactly, then * d[m] * scale[n].

    Bit-identical to the native kernel: same activation quantization, exact integer sums, and the same two
    fp32 multiplications in the same order.
    """
    qx, d = quantize_activations(x)
    return int8_matmul(qx, q).float() * d[:, None] * scale


# ---------------------------------------------------------------------------------------------- q4_0 weights
def quantize_q4_0(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 values (N, nb, 32) in [-8, 7], fp32 d (N, nb)), K zero-padded to nb * 32.

    llama.cpp's q4_0: d = m / -8 with m the block's weight of largest magnitude, so m maps to -8 exactly and
    the opposite extreme rounds to at most 7 (an error of up to one step there, half a step elsewhere). d is
    rounded to fp16 (how it is stored) before the weights are rounded with it.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_q4_0 expects a 2-D weight, got shape {tuple(weight.shape)}")
    N, K = weight.shape
    nb = -(-K // Q4_BLOCK)
    w = F.pad(weight.detach().float(), (0, nb * Q4_BLOCK - K)).view(N, nb, Q4_BLOCK)
    idx = w.abs().argmax(dim=-1, keepdim=True)
    d = (w.gather(-1, idx).squeeze(-1) / -8.0).half().float()
    div = torch.where(d != 0, d, torch.ones_like(d))
    values = torch.round(w / div[..., None]).clamp_(-8, 7).to(torch.int8)
    return values, d


def pack_q4_0(values: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_q4_0`'s output -> the kernel layout (see csrc/int8_gemv.c): packed uint8 (N8/8, nb, 8, 16) and
    fp16 scales (N8/8, nb, 8), rows padded with zeros to N8, a multiple of 8."""
    N, nb, _ = values.shape
    pad = -N % Q4_ROWS
    nib = F.pad((values + 8).to(torch.uint8), (0, 0, 0, 0, 0, pad), value=8)  # zero weights
    nib = nib.view(-1, Q4_ROWS, nb, Q4_BLOCK).transpose(1, 2)  # (G, nb, 8, 32)
    packed = (nib[..., :16] | (nib[..., 16:] << 4)).contiguous()
    scales = F.pad(d, (0, 0, 0, pad)).half().view(-1, Q4_ROWS, nb).transpose(1, 2).contiguous()
    return packed, scales


def unpack_q4_0(packed: torch.Tensor, scales: torch.Tensor, rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `pack_q4_0` for all rows (padding included) or the given row indices:
    (int8 values (R, nb, 32), fp32 d (R, nb))."""
    G, nb = packed.shape[:2]
    if rows is None:
        p = packed.transpose(1, 2).reshape(G * Q4_ROWS, nb, 16)
        s = scales.transpose(1, 2).reshape(G * Q4_ROWS, nb)
    else:
        g, r = rows // Q4_ROWS, rows % Q4_ROWS
        p, s = packed[g, :, r], scales[g, :, r]  # (R, nb, 16), (R, nb)
    values = torch.cat([p & 15, p >> 4], dim=-1).to(torch.int8) - 8
    return values, s.float()


# ---------------------------------------------------------------------------------------------- projections
_scratch = threading.local()


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"a quantized projection needs a non-empty 2-D weight, got shape {tuple(weight.shape)}")


def _dequant_buffer(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reused (rows, cols) buffer of `dtype` for prefill's dequantized weights, one per thread and dtype.

    Why: a fresh tensor of tens of MB per projection is page-faulted in on every call (the allocator
    returns large blocks to the OS), which cost about 10% of a q4_0 prefill GEMM; the layers run one after
    another, so one buffer serves them all.
    """
    need = rows * cols
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < need:
        with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
            buf = buffers[dtype] = torch.empty(need, dtype=dtype)
    return buf[:need].view(rows, cols)


def _dequantized_gemm(x: torch.Tensor, N: int, K: int,
                      rows: Callable[[int, int, torch.Tensor], torch.Tensor],
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x (M, K) times a quantized (N, K) weight whose rows [start, stop) `rows(start, stop, out)`
    dequantizes into `out` (of `dtype`, rounded from the exact fp32 values): GEMMs over at most
    DEQUANT_CHUNK_ELEMENTS weights at a time (chunks start at multiples of 8), so the float copy stays bounded
    (the LM head alone is 268 MB in fp32). `dtype` is the GEMM's operand dtype (bf16: each chunk and x
    rounded to bf16, sums in fp32)."""
    step = max(Q4_ROWS, DEQUANT_CHUNK_ELEMENTS // max(1, K) // Q4_ROWS * Q4_ROWS)
    x = x.to(dtype)
    parts = [native.gemm(x, rows(n, min(n + step, N), _dequant_buffer(min(n + step, N) - n, K, dtype)))
             for n in range(0, N, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _prefill_gemm_dtype() -> torch.dtype:
    """The operand dtype of prefill's GEMMs over dequantized weights: bf16 on CPUs with bf16 matrix hardware
    (about 3x the fp32 GEMM there), else fp32 (see `native.bf16_gemm_in_hardware`)."""
    return torch.bfloat16 if native.bf16_gemm_in_hardware() else torch.float32


class Int8Linear:
    """Weight-only int8: `y = x @ (q * scale).T` without materialising the float weight on the decode path."""

    def __init__(self, weight: torch.Tensor, use_native: bool = False) -> None:
        _check_weight(weight)
        self.q, self.scale = quantize_rowwise(weight)
        if use_native:  # streamed once per decode step: from huge pages
            self.q = pages.copy(self.q)
        self.scale_bf16 = self.scale.to(torch.bfloat16)
        self.out_features, self.in_features = self.q.shape
        self.gemv = native.Gemv(self.q, self.scale) if use_native else None

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized fp32 rows `ids` (any shape) -> (*ids.shape, K): embedding lookups in a tied head."""
        return self.q[ids].float() * self.scale[ids][..., None]

    def _rows_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) dequantized into `out` (computed in fp32, rounded once to out's dtype)."""
        return torch.mul(self.q[start:stop], self.scale[start:stop, None], out=out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] <= INT8_MATVEC_MAX_ROWS and self.gemv is not None:
            y = self.gemv(flat)
        elif flat.shape[0] <= INT8_MATVEC_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), self.q, self.scale_bf16)
        else:  # prefill: one dequantize per matrix is cheap next to an (M, K) x (K, N) GEMM
            # bf16 operands where the CPU multiplies bf16 matrices in hardware (as q4_0 prefill does): bf16
            # rounds the activations by at most 2^-9, the weights' int8 rounding is up to 1/254 of the row's max.
            y = _dequantized_gemm(flat.float(), self.out_features, self.in_features, self._rows_into,
                                  _prefill_gemm_dtype())
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class W8A8Linear:
    """int8 weights (per-row scales) times per-token int8 activations, exact int32 sums (see module doc)."""

    def __init__(self, weight: torch.Tensor, use_native: bool = False) -> None:
        _check_weight(weight)
        self.q, self.scale = quantize_rowwise(weight)
        if use_native:
            self.q = pages.copy(self.q)
        self.out_features, self.in_features = self.q.shape
        self.gemv = native.GemvW8A8(self.q, self.scale) if use_native else None

    @property
    def nbytes(self) -> int:
        extra = self.gemv.wsum.numel() * 4 if self.gemv is not None else 0  # row sums (VNNI's correction)
        return self.q.numel() + self.scale.numel() * 4 + extra

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale[:, None]).to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.scale[ids][..., None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] <= INT8_MATVEC_MAX_ROWS and self.gemv is not None:
            y = self.gemv(flat)
        else:  # prefill, or no native kernels: the same numbers through torch
            y = w8a8_matmul(flat, self.q, self.scale)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


class Q4Linear:
    """q4_0 weights (blocks of 32, fp16 scales) in the kernel's packed layout (see module doc)."""

    def __init__(self, weight: torch.Tensor, use_native: bool = False) -> None:
        _check_weight(weight)
        self.out_features, self.in_features = weight.shape
        self.packed, self.scales = pack_q4_0(*quantize_q4_0(weight))
        if use_native:
            self.packed = pages.copy(self.packed)
        self.gemv = native.GemvQ4(self.packed, self.scales, self.out_features, self.in_features) \
            if use_native else None
        self.use_native = use_native

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 2

    def dequantize(self, dtype: torch.dtype = torch.float32, start: int = 0, stop: int | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of rows [start, stop) (start a multiple of 8), (stop - start, K), exact in fp32 and then
        rounded to `dtype`; into `out` (contiguous, that shape; fp32 or bf16 with the native kernels) when
        given, and then in out's dtype."""
        stop = self.out_features if stop is None else stop
        if self.use_native and (out is None or out.dtype in (torch.float32, torch.bfloat16)):
            w = native.dequantize_q4_0(self.packed, self.scales, self.in_features, start, stop, out,
                                       dtype=out.dtype if out is not None else torch.float32)
        else:
            values, d = unpack_q4_0(self.packed[start // Q4_ROWS: -(-stop // Q4_ROWS)],
                                    self.scales[start // Q4_ROWS: -(-stop // Q4_ROWS)])
            w = (values.float() * d[..., None]).flatten(1)[: stop - start, : self.in_features]
            if out is not None:
                w = out.copy_(w)
        return w if out is not None else w.to(dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        values, d = unpack_q4_0(self.packed, self.scales, ids.reshape(-1))
        w = (values.float() * d[..., None]).flatten(1)[:, : self.in_features]
        return w.view(*ids.shape, self.in_features)


    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if flat.shape[0] <= INT8_MATVEC_MAX_ROWS and self.gemv is not None:
            y = self.gemv(flat)
        elif flat.shape[0] <= INT8_MATVEC_MAX_ROWS:  # decode in torch ops: the kernel's q8 activations
            qx, d = quantize_activation_blocks(flat)
            xq = (qx.float() * d[..., None]).flatten(1)[:, : self.in_features]
            y = F.linear(xq, self.dequantize())
        else:  # prefill: float activations times the dequantized weights
            # In bf16 where the CPU multiplies bf16 matrices in hardware (3x the fp32 GEMM): bf16 rounds the
            # activations less (2^-9) than this mode's decode does (int8 blocks, 2^-8), so nothing is lost
            # next to the 4-bit weights.
            y = _dequantized_gemm(flat.float(), self.out_features, self.in_features,
                                  lambda start, stop, out: self.dequantize(start=start, stop=stop, out=out),
                                  _prefill_gemm_dtype())
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


QuantLinear = Int8Linear | W8A8Linear | Q4Linear
_CLASSES: dict[str, type[Int8Linear] | type[W8A8Linear] | type[Q4Linear]] = {
    "int8": Int8Linear, "w8a8": W8A8Linear, "q4_0": Q4Linear}


def make_quantized(weight: torch.Tensor, mode: str, use_native: bool = False) -> QuantLinear:
    """The projection of `weight` (N, K) in quantization `mode` (one of QUANT_MODES)."""
    if mode not in _CLASSES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {mode!r}")
    return _CLASSES[mode](weight, use_native)
