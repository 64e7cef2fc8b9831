"""The native decode kernels (`inference/native.py`, `csrc/decode.c`) against float64 references, their
argument checks, and what happens when they cannot be built (a reason, and torch ops instead)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lfm2_train.inference import native
from lfm2_train.inference.fast import FastLFM2
from lfm2_train.inference.quant import quantize_rowwise
from lfm2_train.model import LFM2ForCausalLM, get_preset

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


@pytest.fixture
def rebuilt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """Forget the loaded library so a test can change the environment; restore it afterwards."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "kernels"))
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)  # each test sets the switch it needs
    native._library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native._library.cache_clear()


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    full = w.double() * (scale.double()[:, None] if scale is not None else 1.0)
    return x.double() @ full.T


@needs_native
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 5])
# 8-row blocks, 8-wide vectors and 64-byte lines: shapes with every kind of remainder
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (8, 8), (13, 33), (64, 1024), (129, 200), (1000, 999)])
def test_gemv_matches_float64(kind: str, rows: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(N * 1000 + K)
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(N, K, generator=g)
    scale = None
    if kind == "bf16":
        w = w.bfloat16()
    elif kind == "int8":
        w, scale = quantize_rowwise(w)
    got = native.gemv(x, w, scale)
    want = reference(x, w, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, N)
    # fp32 accumulation of K products: error grows like sqrt(K) * eps * |x||w|
    bound = 4 * (K**0.5) * 2**-23 * (x.double().abs() @ (reference(torch.eye(K), w, scale).abs())).max()
    assert (got.double() - want).abs().max() <= bound + 1e-30


@needs_native
def test_gemv_rows_are_independent_and_empty_shapes_work() -> None:
    x = torch.randn(3, 40)
    w = torch.randn(24, 40)
    together = native.gemv(x, w)
    for i in range(3):
        torch.testing.assert_close(together[i : i + 1], native.gemv(x[i : i + 1], w), rtol=0, atol=0)
    assert native.gemv(torch.randn(0, 40), w).shape == (0, 24)
    assert torch.equal(native.gemv(torch.randn(2, 0), torch.randn(5, 0)), torch.zeros(2, 5))
    # bf16 activations are read as fp32 (no extra rounding of x)
    xb = torch.randn(1, 40).bfloat16()
    torch.testing.assert_close(native.gemv(xb, w), native.gemv(xb.float(), w), rtol=0, atol=0)


@needs_native
def test_gemv_threads_follow_torch() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert native.max_threads() == 2
        torch.set_num_threads(1)
        assert native.max_threads() == 1
    finally:
        torch.set_num_threads(before)


@needs_native
def test_gemv_rejects_bad_arguments() -> None:
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"x must be \(M, 16\)"):
        native.gemv(torch.randn(1, 15), w)
    with pytest.raises(ValueError, match="contiguous 2-D"):
        native.gemv(torch.randn(1, 8), w.t())
    with pytest.raises(TypeError, match="dtype"):
        native.gemv(torch.randn(1, 16), w.half())
    q, s = quantize_rowwise(w)
    with pytest.raises(ValueError, match="per-row scale"):
        native.gemv(torch.randn(1, 16), q)
    with pytest.raises(ValueError, match="per-row scale"):
        native.gemv(torch.randn(1, 16), w, s)
    with pytest.raises(ValueError, match=r"scale must be contiguous fp32 of shape \(8,\)"):
        native.gemv(torch.randn(1, 16), q, s[:4])


def test_gemm_matches_linear() -> None:
    x = torch.randn(2, 40, 64)
    w = torch.randn(96, 64)
    torch.testing.assert_close(native.gemm(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    xb, wb = x.bfloat16(), w.bfloat16()  # no oneDNN fp32 path: plain F.linear
    torch.testing.assert_close(native.gemm(xb, wb), F.linear(xb, wb), rtol=0, atol=0)


def test_disabled_by_environment_falls_back(rebuilt: pytest.MonkeyPatch) -> None:
    rebuilt.setenv(native.ENV_SWITCH, "0")
    assert not native.available()
    assert native.ENV_SWITCH in str(native.unavailable_reason())
    model = LFM2ForCausalLM(get_preset("tiny")).eval()
    assert FastLFM2.from_model(model).use_native is False  # auto: torch ops
    with pytest.raises(native.NativeKernelError, match=native.ENV_SWITCH):
        FastLFM2.from_model(model, kernels="native")
    with pytest.raises(native.NativeKernelError, match="unavailable"):
        native.gemv(torch.randn(1, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="kernels must be one of"):
        FastLFM2.from_model(model, kernels="fastest")


def test_missing_or_failing_compiler_gives_a_reason(rebuilt: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if native._cpu_reason() is not None:
        pytest.skip(f"not an AVX2 x86-64 CPU: {native._cpu_reason()}")
    rebuilt.setenv("CC", str(tmp_path / "no-such-cc"))
    assert not native.available()
    assert "no C compiler" in str(native.unavailable_reason())
    native._library.cache_clear()
    failing = tmp_path / "failing-cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: simulated failure' >&2\nexit 1\n")
    failing.chmod(0o755)
    rebuilt.setenv("CC", str(failing))
    assert not native.available()
    reason = str(native.unavailable_reason())
    assert "simulated failure" in reason and "decode.c" in reason
    assert not any((tmp_path / "kernels").glob("*.so"))  # nothing half-built is left to load later


@needs_native
def test_build_is_cached_by_source_and_compiler(rebuilt: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert native.available()
    built = list((tmp_path / "kernels").glob("lfm2_decode-*.so"))
    assert len(built) == 1
    stamp = os.stat(built[0]).st_mtime_ns
    native._library.cache_clear()
    assert native.available()  # loads the cached library: no rebuild
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [built[0].name]
    assert os.stat(built[0]).st_mtime_ns == stamp


def attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
                        scale: float, valid: torch.Tensor | None) -> torch.Tensor:
    """float64 softmax attention, KV heads repeated as `repeat_interleave` does."""
    B, H, D = q.shape
    G = keys.shape[1]
    k = keys[:, :, :length].double().repeat_interleave(H // G, dim=1)  # (B, H, S, D)
    v = values[:, :, :length].double().repeat_interleave(H // G, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), k) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (B, H, G, D, L, S): GQA ratios 1, 2 and 4; head sizes with and without a vector tail; lengths with and
# without a partial last block of 8 positions; one position only
@pytest.mark.parametrize("B,H,G,D,L,S", [(1, 16, 8, 64, 40, 33), (2, 4, 4, 12, 20, 8), (3, 8, 2, 16, 17, 1),
                                         (2, 6, 3, 128, 70, 64)])
def test_decode_attention_matches_float64(dtype: torch.dtype, B: int, H: int, G: int, D: int, L: int,
                                          S: int) -> None:
    g = torch.Generator().manual_seed(B * 100 + S)
    q = torch.randn(B, H, D, generator=g)
    keys = (torch.randn(B, G, L, D, generator=g) * 2).to(dtype)  # * 2: peaked softmax rows too
    values = torch.randn(B, G, L, D, generator=g).to(dtype)
    got = native.decode_attention(q, keys, values, S, D**-0.5)
    assert got.dtype == torch.float32 and got.shape == (B, H, D)
    torch.testing.assert_close(got.double(), attention_reference(q, keys, values, S, D**-0.5, None),
                               rtol=1e-5, atol=1e-5)


@needs_native
def test_decode_attention_padding_is_never_attended() -> None:
    B, H, G, D, L, S = 2, 4, 2, 16, 32, 27
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, D, generator=g)
    keys, values = torch.randn(B, G, L, D, generator=g), torch.randn(B, G, L, D, generator=g)
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[0, :11] = False  # left padding covering a whole block of 8 and part of the next
    valid[1, 5] = False
    got = native.decode_attention(q, keys, values, S, 0.25, valid)
    torch.testing.assert_close(got.double(), attention_reference(q, keys, values, S, 0.25, valid),
                               rtol=1e-5, atol=1e-5)
    # garbage in padded slots changes nothing
    keys[0, :, :11] = 1e4
    values[0, :, :11] = -1e4
    torch.testing.assert_close(native.decode_attention(q, keys, values, S, 0.25, valid), got, rtol=0, atol=0)


@needs_native
def test_decode_attention_rejects_bad_arguments() -> None:
    q, cache = torch.randn(1, 4, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="length"):
        native.decode_attention(q, cache, cache, 11, 1.0)
    with pytest.raises(ValueError, match="divisible"):
        native.decode_attention(torch.randn(1, 3, 8), cache, cache, 4, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        native.decode_attention(q, cache[:, :, :5], cache[:, :, :5], 4, 1.0)
    with pytest.raises(ValueError, match=r"valid must be \(B, length\)"):
        native.decode_attention(q, cache, cache, 4, 1.0, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        native.decode_attention(q, cache.double(), cache.double(), 4, 1.0)
    with pytest.raises(TypeError, match="fp32, bf16 or fp16"):
        native.decode_attention(q, cache.half(), cache.bfloat16(), 4, 1.0)


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 1024), (3, 5, 16, 64), (2, 7), (600, 1030)])
def test_rms_norm_matches_the_model(shape: tuple[int, ...]) -> None:
    from lfm2_train.model.layers import RMSNorm

    x = torch.randn(*shape)
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        want = norm(x)
    got = native.rms_norm(x, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    strided = torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]  # non-contiguous input
    torch.testing.assert_close(native.rms_norm(strided, norm.weight.detach(), 1e-5),
                               norm(strided).detach(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fp32"):
        native.rms_norm(x.bfloat16(), norm.weight.detach(), 1e-5)


@needs_native
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_conv_step_matches_a_window_sum(k: int) -> None:
    B, d = 3, 20
    g = torch.Generator().manual_seed(k)
    bcx = torch.randn(B, 3 * d, generator=g)
    state = torch.randn(B, k - 1, d, generator=g)
    taps = torch.randn(k, d, generator=g)
    b, c, x = bcx.chunk(3, dim=-1)
    window = torch.cat([state, (b * x)[:, None]], dim=1)  # (B, k, d), oldest first
    want = c * (window * taps).sum(1)
    got = native.conv_step(bcx, state, taps)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, window[:, 1:], rtol=0, atol=0)  # shifted in place
    with pytest.raises(ValueError, match="shapes"):
        native.conv_step(bcx[:, :-1], state, taps)
