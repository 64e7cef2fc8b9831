"""The whole decode step as one native call (`DecodeStep`) against the layer-by-layer fast path, the 16-bit KV
cache it writes, and the huge-page memory the fast path streams its weights from."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lfm2_train.inference import generate, left_pad, native, pages
from lfm2_train.inference.decode_step import LIN_BF16, LIN_Q4_0, LIN_W8A8
from lfm2_train.inference.fast import GEMM_MIN_ROWS, FastLFM2
from lfm2_train.model import LFM2ForCausalLM, get_preset

needs_native = pytest.mark.skipif(not native.available(), reason=str(native.unavailable_reason()))
PROMPTS = [torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 1, 11)]
MODES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.float32, "int8"),
         "w8a8": (torch.float32, "w8a8"), "q4_0": (torch.float32, "q4_0")}
# Largest |step - layer-by-layer| / max |logit| over 6 decode steps. fp32 and the quantized modes differ by
# summation order only (an int8 activation can land on the other side of a rounding boundary: w8a8 / q4_0
# get room for that); bf16: the step keeps the residual stream in fp32 where the layer path rounds it to bf16
# after every op, so the two differ by bf16 rounding (the tolerance of bf16 against fp32 in test_fast.py).
TOL = {"fp32": 1e-5, "bf16": 0.01, "int8": 1e-4, "w8a8": 0.01, "q4_0": 0.01}


def tiny(name: str = "tiny") -> LFM2ForCausalLM:
    torch.manual_seed(0)
    return LFM2ForCausalLM(get_preset(name).replace(initializer_range=0.02)).eval()


def decode_logits(fast: FastLFM2, steps: int = 6) -> torch.Tensor:
    """Logits of `steps` greedy-free decode steps (fixed tokens) after a left-padded prefill: (steps, B, V)."""
    ids, mask = left_pad(PROMPTS, pad_id=0)
    state = fast.new_state(len(PROMPTS), ids.shape[1] + steps)
    fast.prefill(state, ids, mask)
    return torch.stack([fast.decode(state, torch.tensor([3 + i, 40 + i, 77 + i])) for i in range(steps)])


@needs_native
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kv", ["default", "fp32"])
def test_step_matches_layer_by_layer(mode: str, kv: str) -> None:
    model = tiny()
    dtype, quant = MODES[mode]
    kv_dtype = None if kv == "default" else torch.float32
    fused = FastLFM2.from_model(model, dtype=dtype, quant=quant, kernels="native", kv_dtype=kv_dtype)
    layered = FastLFM2.from_model(model, dtype=dtype, quant=quant, kernels="native", kv_dtype=kv_dtype, fused=False)
    assert fused.step is not None and layered.step is None
    assert fused.kv_dtype == layered.kv_dtype
    want, got = decode_logits(layered), decode_logits(fused)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= TOL[mode], rel


@needs_native
@pytest.mark.parametrize("mode", ["bf16", "w8a8", "q4_0"])
def test_step_runs_the_isa_level_its_projections_chose(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capped at AVX2 (as on an AVX2-only CPU), the step runs the projections' AVX2 variants (bf16: weights
    widened to fp32, not vdpbf16ps; int8 products: vpmaddubsw) and still matches the layer path."""
    monkeypatch.setenv(native.ENV_ISA, native.isas()[0])
    model = tiny()
    dtype, quant = MODES[mode]
    fused = FastLFM2.from_model(model, dtype=dtype, quant=quant, kernels="native")
    layered = FastLFM2.from_model(model, dtype=dtype, quant=quant, kernels="native", fused=False)
    layer = fused.step._layers[0]
    assert layer.w13.kind == {"bf16": LIN_BF16, "w8a8": LIN_W8A8, "q4_0": LIN_Q4_0}[mode] and layer.w13.isa == 0
    want, got = decode_logits(layered), decode_logits(fused)
    assert ((got - want).abs().max() / want.abs().max()).item() <= TOL[mode]


def test_kv_cache_dtype_defaults() -> None:
    """fp16 for quantized fp32 modes (half the bytes; llama.cpp's default), else the activation dtype."""
    model = tiny()
    assert FastLFM2.from_model(model).kv_dtype == torch.float32
    assert FastLFM2.from_model(model, dtype=torch.bfloat16).kv_dtype == torch.bfloat16
    for quant in ("int8", "w8a8", "q4_0"):
        fast = FastLFM2.from_model(model, quant=quant)
        assert fast.kv_dtype == torch.float16
        assert all(t.dtype == torch.float16 for t in fast.new_state(1, 8).keys.values())
    assert FastLFM2.from_model(model, quant="int8", kv_dtype=torch.float32).kv_dtype == torch.float32
    with pytest.raises(ValueError, match="kv_dtype"):
        FastLFM2.from_model(model, kv_dtype=torch.int8)


@pytest.mark.parametrize("kernels", ["torch", pytest.param("native", marks=needs_native)])
def test_fp16_kv_cache_stays_within_the_quantization_tolerance(kernels: str) -> None:
    """An fp16 cache rounds keys and values by 2^-11 relative; through the layers that stays well inside the
    int8 mode's own tolerance against fp32 (0.02 of the largest logit, test_fast.py)."""
    model = tiny()
    ids, mask = left_pad(PROMPTS, pad_id=0)
    half = FastLFM2.from_model(model, quant="int8", kernels=kernels)
    full = FastLFM2.from_model(model, quant="int8", kernels=kernels, kv_dtype=torch.float32)
    assert half.kv_dtype == torch.float16
    for got, want in [(decode_logits(half), decode_logits(full)), (half.logits(ids, mask), full.logits(ids, mask))]:
        rel = ((got - want).abs().max() / want.abs().max()).item()
        assert rel <= 0.006, rel


@needs_native
def test_greedy_tokens_of_the_step_equal_the_reference_model() -> None:
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny").replace(initializer_range=0.2)).eval()
    fast = FastLFM2.from_model(model, kernels="native")
    assert fast.step is not None
    assert generate(fast, PROMPTS, max_new_tokens=16).tokens == generate(model, PROMPTS, max_new_tokens=16).tokens


@needs_native
def test_step_is_not_used_where_it_cannot_run() -> None:
    assert FastLFM2.from_model(tiny("tiny-moe"), kernels="native").step is None  # MoE layers: layer by layer
    assert FastLFM2.from_model(tiny(), kernels="torch").step is None
    assert FastLFM2.from_model(tiny(), dtype=torch.float16, kernels="native").step is None  # no fp16 gemv


@needs_native
def test_large_batches_decode_layer_by_layer_with_the_same_numbers() -> None:
    """More rows than GEMM_MIN_ROWS: decode's products are GEMMs, so the layer path runs; results agree."""
    model = tiny()
    fast = FastLFM2.from_model(model, kernels="native")
    B = GEMM_MIN_ROWS + 1
    ids = torch.randint(1, 512, (B, 4), generator=torch.Generator().manual_seed(0))
    state = fast.new_state(B, 6)
    fast.prefill(state, ids)
    big = fast.decode(state, ids[:, -1])
    small_state = fast.new_state(2, 6)
    fast.prefill(small_state, ids[:2])
    torch.testing.assert_close(fast.decode(small_state, ids[:2, -1]), big[:2], rtol=1e-4, atol=1e-4)


@needs_native
def test_step_refuses_a_full_state() -> None:
    fast = FastLFM2.from_model(tiny(), kernels="native")
    state = fast.new_state(1, 3)
    fast.prefill(state, torch.tensor([[1, 2, 3]]))
    with pytest.raises(ValueError, match="holds 3 tokens; 3 used"):
        fast.decode(state, torch.tensor([4]))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_rounding_to_16_bits_equals_torch(dtype: torch.dtype) -> None:
    """What the step writes into a 16-bit KV cache: round to nearest even, as `.to(dtype)`, over every range
    (fp16 subnormals, overflow to inf, signed zeros, infinities, NaN)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.logspace(-12, 7, 200_000)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0, -65520.0,
                            2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14, 2.0**-14 * (1 - 2.0**-11), 3.4e38, 1e-45])
    x = torch.cat([x, special])
    got, want = native.round_half(x, dtype), x.to(dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert bool(native.round_half(torch.tensor([float("nan")]), dtype).isnan().all())


@needs_native
def test_swiglu_matches_torch_over_the_exponent_range() -> None:
    """The step's vectorised SwiGLU (exp within about 1 ulp) against torch, with a tail and inputs where
    exp(-a) under- or overflows."""
    g = torch.Generator().manual_seed(0)
    ab = torch.randn(3, 2 * 37, generator=g) * 8
    ab[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 88.5, -88.5])
    a, gate = ab.chunk(2, dim=-1)
    torch.testing.assert_close(native.swiglu(ab), torch.nn.functional.silu(a) * gate, rtol=2e-6, atol=1e-30)


# ---------------------------------------------------------------------------------------------- pages
def _mapping_flags(t: torch.Tensor) -> str:
    """The smaps block of the mapping holding t's first byte ('' where /proc is not there)."""
    smaps = Path("/proc/self/smaps")
    if not smaps.exists():
        return ""
    addr = t.data_ptr()
    blocks = re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", smaps.read_text())
    for block in blocks:
        lo, hi = (int(v, 16) for v in block.split(" ", 1)[0].split("-"))
        if lo <= addr < hi:
            return block
    return ""


def test_huge_page_tensors_are_zeroed_exact_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.randn(1024, 1024)  # 4 MiB
    copied = pages.copy(big)
    assert torch.equal(copied, big) and copied.is_contiguous() and copied.data_ptr() != big.data_ptr()
    zeros = pages.empty((3, 1024, 1024), torch.float16)
    assert zeros.shape == (3, 1024, 1024) and zeros.dtype == torch.float16 and not bool(zeros.any())
    with torch.inference_mode():  # the fast path writes its caches under inference mode; tests outside it
        zeros[0, 0, 0] = 1.0
    zeros[1, 0, 0] = 2.0
    assert float(zeros.float().sum()) == 3.0
    block = _mapping_flags(copied)
    if pages.enabled() and "THPeligible" in block:  # Linux: the kernel was asked for huge pages
        assert "THPeligible:    1" in block or "hg" in block, block
    small = pages.copy(torch.arange(10))
    assert torch.equal(small, torch.arange(10))
    monkeypatch.setenv(pages.ENV_SWITCH, "0")
    assert not pages.enabled()
    assert torch.equal(pages.copy(big), big)
