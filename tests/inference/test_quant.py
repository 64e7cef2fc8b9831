"""Quantized decode (`inference/quant.py`, `csrc/int8_gemv.c`, `csrc/bf16_gemv.c`): every kernel and ISA path
against float64 references with bounds derived from the quantization steps, and the torch reference paths.

Bounds, for one output y = sum_k x_k w_k (s: weight scale of the row or block, d: activation scale):
- W8A8 kernel vs its definition: bit-identical (exact int32 sums, same fp32 multiplications).
- W8A8 vs float: x = d(q + δ), w = s(p + ε) with |δ|, |ε| <= 1/2, so
  |y - d s sum q p| <= sum_k (|x_k| s/2 + |w_k| d/2 + s d/4).
- q4_0 weights: |w - s p| <= |s| (half a step, except where the block's opposite extreme is clamped to +7:
  up to one step; fp16 rounding of s adds at most 2^-10 of a step there); q4_0 vs float:
  |y - y_q| <= sum_k (|x_k| |s_b| + |w_k| d_b/2 + |s_b| d_b/2).
- q4_0 kernel vs float64 evaluation of the same integers: fp32 accumulation over nb blocks of 4 lanes,
  <= (nb + 8) 2^-23 sum_b |s_b d_b| sum_j |p_j q_j|.
- bf16 weights: |y - x.w| <= K 2^-24 sum_k |x_k w_k| (fp32 accumulation; bf16 activations go through
  vdpbf16ps, whose products are exact, fp32 ones through the widening kernel).
"""

from __future__ import annotations

import pytest
import torch

from lfm2_train.inference import native, quant

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")
ISAS = native.isas() if native.available() else ()

# N = 1..17 (every remainder of the 8-row groups), K from 1 to past 512 with odd sizes (every remainder of
# 32- and 64-byte vectors and of 32-weight blocks), plus sizes of real models.
SHAPES = [(n, k) for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17) for k in (1, 3, 31, 32, 33, 64, 65, 127)]
SHAPES += [(13, 255), (6, 511), (11, 513), (24, 1000), (40, 1024), (9, 4608), (3, 8192)]


def data(N: int, K: int, M: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g) * 3  # uneven channel magnitudes
    w = torch.randn(N, K, generator=g) * 0.05
    return x, w


# ---------------------------------------------------------------------------------------------- quantizers
def test_activation_quantization_is_symmetric_per_row_and_per_block() -> None:
    x = torch.tensor([[0.0, 1.0, -2.54, 0.3], [0.0, 0.0, 0.0, 0.0]])
    q, d = quant.quantize_activations(x)
    assert torch.equal(d, torch.tensor([2.54 / 127, 0.0]))
    assert q[0, 2] == -127 and q[0, 1] == 50 and torch.equal(q[1], torch.zeros(4, dtype=torch.int8))
    assert int(q.abs().max()) == 127
    x, _ = data(1, 70, 3, 0)
    qb, db = quant.quantize_activation_blocks(x)
    assert qb.shape == (3, 3, 32) and db.shape == (3, 3)
    assert torch.equal(qb[:, 2, 6:], torch.zeros(3, 26, dtype=torch.int8))  # zero padding past K
    err = (qb.float() * db[..., None]).flatten(1)[:, :70] - x
    assert bool((err.abs() <= db.repeat_interleave(32, 1)[:, :70] / 2 * (1 + 2**-20)).all())


def test_q4_0_weights_within_one_step_and_pack_roundtrip() -> None:
    _, w = data(21, 100, 1, 1)
    values, d = quant.quantize_q4_0(w)
    assert values.shape == (21, 4, 32) and d.shape == (21, 4)
    assert int(values.min()) >= -8 and int(values.max()) <= 7
    assert torch.equal(d, d.half().float())  # stored as fp16
    wq = (values.float() * d[..., None]).flatten(1)
    steps = d.abs().repeat_interleave(32, 1)
    assert bool(((wq[:, :100] - w).abs() <= steps[:, :100] * (1 + 2**-10)).all())
    assert bool((wq[:, 100:] == 0).all())
    # the block's largest magnitude is represented (up to the fp16 rounding of d)
    big = w.abs().amax(1)
    assert bool(((wq[:, :100].abs().amax(1) - big).abs() <= big * 2**-10).all())
    packed, scales = quant.pack_q4_0(values, d)
    assert packed.shape == (3, 4, 8, 16) and packed.dtype == torch.uint8 and scales.dtype == torch.float16
    back_v, back_d = quant.unpack_q4_0(packed, scales)
    assert torch.equal(back_v[:21], values) and torch.equal(back_d[:21], d)
    assert bool((back_v[21:] == 0).all())  # padding rows are zero weights
    ids = torch.tensor([0, 20, 7, 8])
    rv, rd = quant.unpack_q4_0(packed, scales, ids)
    assert torch.equal(rv, values[ids]) and torch.equal(rd, d[ids])


def test_int8_matmul_is_exact_with_and_without_int_mm(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (5, 3000), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 3000), generator=g, dtype=torch.int8)
    b[0] = 127
    a[0] = 127  # the largest sums: 3000 * 127^2 > 2^24, beyond what one fp32 GEMM would sum exactly
    want = (a.double() @ b.double().t()).to(torch.int64)
    assert torch.equal(quant.int8_matmul(a, b).to(torch.int64), want)
    monkeypatch.setattr(quant, "int_mm_is_exact", lambda: False)  # the CPUs where oneDNN saturates
    assert torch.equal(quant.int8_matmul(a, b).to(torch.int64), want)
    assert quant.int8_matmul(a[:0], b).shape == (0, 7)


# ---------------------------------------------------------------------------------------------- W8A8
def w8a8_float_bound(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, N): sum_k (|x_k| s/2 + |w_k| d/2 + s d/4)."""
    d = x.abs().amax(1, keepdim=True).double() / 127  # (M, 1)
    s = scale.double()[None]  # (1, N)
    xa, wa = x.double().abs(), w.double().abs()
    return xa.sum(1, keepdim=True) * s / 2 + d * wa.sum(1)[None] / 2 + d * s * x.shape[1] / 4


@pytest.mark.parametrize("rows", [1, 3])
def test_w8a8_reference_within_derived_bound(rows: int) -> None:
    for i, (N, K) in enumerate(SHAPES):
        x, w = data(N, K, rows, i)
        q, scale = quant.quantize_rowwise(w)
        got = quant.w8a8_matmul(x, q, scale).double()
        exact = x.double() @ w.double().t()
        bound = w8a8_float_bound(x, w, scale) + 2**-21 * got.abs()  # + the final fp32 multiplications
        assert bool(((got - exact).abs() <= bound).all()), (N, K)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_w8a8_kernel_is_bit_identical_to_reference(isa: str, rows: int) -> None:
    for i, (N, K) in enumerate(SHAPES):
        x, w = data(N, K, rows, i)
        q, scale = quant.quantize_rowwise(w)
        gemv = native.GemvW8A8(q, scale, isa=isa)
        assert gemv.isa == isa
        torch.testing.assert_close(gemv(x), quant.w8a8_matmul(x, q, scale), rtol=0, atol=0, msg=f"{N}x{K}")


@needs_native
@pytest.mark.parametrize("isa", ISAS)
def test_w8a8_kernel_extremes_do_not_overflow(isa: str) -> None:
    """|q| = |w| = 127 everywhere at K = 8192: sums of 1.3e8, the int16 pairs of vpmaddubsw at their limit."""
    K = 8192
    x = torch.full((2, K), 3.0)
    x[1, ::2] = -3.0
    w = torch.full((9, K), 0.5)
    w[1::2, 1::2] = -0.5
    q, scale = quant.quantize_rowwise(w)
    got = native.GemvW8A8(q, scale, isa=isa)(x)
    torch.testing.assert_close(got, quant.w8a8_matmul(x, q, scale), rtol=0, atol=0)
    torch.testing.assert_close(got.double(), x.double() @ w.double().t(), rtol=1e-6, atol=1e-3)


@needs_native
def test_w8a8_rejects_minus_128_and_bad_shapes() -> None:
    q = torch.zeros(4, 8, dtype=torch.int8)
    q[1, 2] = -128
    with pytest.raises(ValueError, match=r"\[-127, 127\]"):
        native.GemvW8A8(q, torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        native.GemvW8A8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match=r"x must be \(M, 8\)"):
        native.GemvW8A8(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4))(torch.ones(1, 9))


# ---------------------------------------------------------------------------------------------- q4_0
def q4_parts(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 (M, N, nb) block sums S, (M, N, nb) scale products s_b d_b, of the quantized operands."""
    values, d = quant.quantize_q4_0(w)
    qx, dx = quant.quantize_activation_blocks(x)
    S = torch.einsum("mbj,nbj->mnb", qx.double(), values.double())
    return S, d.double()[None] * dx.double()[:, None], torch.einsum("mbj,nbj->mnb", qx.double().abs(),
                                                                      values.double().abs())


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_q4_0_kernel_matches_float64_of_the_same_integers(isa: str, rows: int) -> None:
    for i, (N, K) in enumerate(SHAPES):
        x, w = data(N, K, rows, i)
        packed, scales = quant.pack_q4_0(*quant.quantize_q4_0(w))
        gemv = native.GemvQ4(packed, scales, N, K, isa=isa)
        assert gemv.isa == isa
        got = gemv(x).double()
        S, sd, Sabs = q4_parts(x, w)
        want = (S * sd).sum(-1)
        nb = S.shape[-1]
        bound = (nb + 8) * 2**-23 * (Sabs * sd.abs()).sum(-1)
        assert bool(((got - want).abs() <= bound + 1e-30).all()), (N, K)


@pytest.mark.parametrize("rows", [1, 4])
def test_q4_0_within_derived_bound_of_float(rows: int) -> None:
    for i, (N, K) in enumerate(SHAPES):
        x, w = data(N, K, rows, i)
        lin = quant.Q4Linear(w)  # torch ops: the kernel's numbers up to fp32 rounding
        got = lin(x).double()
        values, s = quant.quantize_q4_0(w)
        _, dx = quant.quantize_activation_blocks(x)
        sk = s.double().abs().repeat_interleave(32, 1)[:, :K]  # (N, K)
        dk = dx.double().repeat_interleave(32, 1)[:, :K]  # (M, K)
        xa, wa = x.double().abs(), w.double().abs()
        bound = xa @ (sk * (1 + 2**-10)).t() + dk @ wa.t() / 2 + dk @ sk.t() / 2
        bound += K * 2**-22 * (xa @ wa.t() + bound)  # fp32 rounding of the torch evaluation
        assert bool(((got - x.double() @ w.double().t()).abs() <= bound).all()), (N, K)


@needs_native
def test_q4_0_dequantize_native_equals_torch() -> None:
    _, w = data(45, 200, 1, 3)
    native_lin, torch_lin = quant.Q4Linear(w, use_native=True), quant.Q4Linear(w)
    assert torch.equal(native_lin.dequantize(), torch_lin.dequantize())
    assert torch.equal(native_lin.dequantize(start=16, stop=41), torch_lin.dequantize(start=16, stop=41))
    assert torch.equal(native_lin.dequantize()[16:41], native_lin.dequantize(start=16, stop=41))
    with pytest.raises(ValueError, match="dequantize_q4_0"):
        native.dequantize_q4_0(native_lin.packed, native_lin.scales, 200, 3, 10)


@pytest.mark.parametrize("bf16_hardware", [False, True])
def test_q4_0_prefill_gemm_in_row_chunks(monkeypatch: pytest.MonkeyPatch, bf16_hardware: bool) -> None:
    """Prefill multiplies dequantized row chunks: in fp32, or in bf16 (operands rounded to bf16, fp32 sums)
    on a CPU with bf16 matrix hardware; chunking never changes the result."""
    monkeypatch.setattr(quant.native, "bf16_gemm_in_hardware", lambda: bf16_hardware)
    _, w = data(40, 64, 1, 4)
    x = torch.randn(20, 64)
    lin = quant.Q4Linear(w)
    whole = lin(x)
    monkeypatch.setattr(quant, "DEQUANT_CHUNK_ELEMENTS", 16 * 64)  # 16 rows per chunk: 3 chunks
    torch.testing.assert_close(lin(x), whole, rtol=0, atol=0)
    deq = lin.dequantize()
    if bf16_hardware:  # the reference of the bf16 GEMM: bf16 operands, fp32 sums, one bf16 rounding at the end
        ref = x.bfloat16().double() @ deq.bfloat16().double().t()
        assert ((whole.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()
        exact = x.double() @ deq.double().t()  # and within bf16 rounding of both operands of the fp32 product
        bound = 2 * 2**-8 * (x.double().abs() @ deq.double().abs().t()) + 2**-8 * exact.abs()
        assert ((whole.double() - exact).abs() <= bound).all()
    else:
        torch.testing.assert_close(whole, x @ deq.t(), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- bf16
@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3])
def test_bf16_kernels_within_bound(isa: str, rows: int) -> None:
    """bf16 activations: vdpbf16ps where the CPU has it (exact products, fp32 sums); fp32 activations keep
    their precision through the widening kernel on every ISA."""
    bf16_dot = isa == "avx512" and bool(native.cpu_features() & native.FEAT_AVX512_BF16)
    for i, (N, K) in enumerate(SHAPES):
        x, w = data(N, K, rows, i)
        wb, xb = w.bfloat16(), x.bfloat16()
        gemv = native.Gemv(wb, isa=isa)
        assert gemv.isa == ("avx512" if bf16_dot else "avx2")
        for xin in (xb, x):
            exact = xin.double() @ wb.double().t()
            mag = xin.double().abs() @ wb.double().abs().t()
            got = gemv(xin).double()
            assert bool(((got - exact).abs() <= K * 2**-24 * mag + 1e-30).all()), (N, K, xin.dtype)


# ---------------------------------------------------------------------------------------------- dispatch
@needs_native
def test_isa_choice_follows_the_environment_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    q, scale = quant.quantize_rowwise(torch.randn(8, 16))
    monkeypatch.delenv(native.ENV_ISA, raising=False)
    assert native.kernel_isa() == native.isas()[-1]
    monkeypatch.setenv(native.ENV_ISA, "avx2")
    assert native.GemvW8A8(q, scale).isa == "avx2"
    assert native.Gemv(torch.randn(8, 16).bfloat16()).isa == "avx2"
    monkeypatch.setenv(native.ENV_ISA, "avx512")  # a cap: never wider than the CPU
    assert native.kernel_isa() == native.isas()[-1]
    monkeypatch.setenv(native.ENV_ISA, "sse2")
    with pytest.raises(ValueError, match="LFM2_KERNEL_ISA"):
        native.GemvW8A8(q, scale)


@pytest.mark.parametrize("mode", quant.QUANT_MODES)
def test_tied_embedding_rows_are_the_dequantized_head(mode: str) -> None:
    _, w = data(19, 96, 1, 5)
    lin = quant.make_quantized(w, mode)
    ids = torch.tensor([[3, 18], [0, 9]])
    full = lin.dequantize()
    torch.testing.assert_close(lin.rows(ids), full[ids], rtol=0, atol=0)
    with pytest.raises(ValueError, match="quant must be one of"):
        quant.make_quantized(w, "q2_k")
    with pytest.raises(ValueError, match="non-empty 2-D weight"):
        quant.make_quantized(torch.randn(4, 0), mode)


@pytest.mark.parametrize("mode", ["int8", "q4_0"])
def test_prefill_scratch_works_in_and_out_of_inference_mode(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dequantization buffer is reused across calls: one made under inference_mode must stay writable."""
    monkeypatch.setattr(quant.native, "bf16_gemm_in_hardware", lambda: False)  # the fp32 GEMM, exact reference
    _, w = data(24, 64, 1, 6)
    lin = quant.make_quantized(w, mode)
    x = torch.randn(20, 64)
    with torch.inference_mode():
        inside = lin(x)
    torch.testing.assert_close(lin(x), inside, rtol=0, atol=0)
    torch.testing.assert_close(inside, x @ lin.dequantize().t(), rtol=1e-5, atol=1e-5)
