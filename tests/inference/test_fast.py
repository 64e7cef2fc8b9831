"""The fast CPU path (`FastLFM2`) against the reference model: identical greedy tokens in fp32 (dense and MoE,
left-padded batches, chunked prefill), logits to float rounding, bf16 / int8 / w8a8 / q4_0 within stated
tolerances."""

from __future__ import annotations

import pytest
import torch

from lfm2_train.inference import SamplingConfig, generate, left_pad, native
from lfm2_train.inference.fast import DenseLinear, FastLFM2
from lfm2_train.inference.quant import Int8Linear, W8A8Linear, quantize_rowwise
from lfm2_train.model import LFM2ForCausalLM, get_preset

# Prompts of different lengths, so the batch is left-padded (1-token row included).
PROMPTS = [
    torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 1, 11)
]
# Largest |fast - reference| / max |reference logit| over all real positions (init 0.02 models).
# bf16: the reference model run in bf16 shows the same error (0.004 dense, 0.022 MoE), since both round
# activations to bf16 at the same points; int8 adds the per-row weight rounding (1/254 of a row's max);
# w8a8 the per-token activation rounding too (measured 0.010-0.017); q4_0 rounds weights to 1/16 of a
# block's max, a large step on random Gaussian weights (measured 0.09-0.13; trained models: see
# test_quant_agreement.py).
TOL = {("tiny", "bf16"): 0.01, ("tiny", "int8"): 0.02, ("tiny-moe", "bf16"): 0.05, ("tiny-moe", "int8"): 0.05,
       ("tiny", "w8a8"): 0.03, ("tiny-moe", "w8a8"): 0.03, ("tiny", "q4_0"): 0.2, ("tiny-moe", "q4_0"): 0.2}


# Decode's matrix-vector products through the native kernels and through `F.linear`: both must agree.
KERNELS = [
    "torch",
    pytest.param("native", marks=pytest.mark.skipif(not native.available(), reason=str(native.unavailable_reason()))),
]


def build(name: str, init: float = 0.2, seed: int = 0) -> LFM2ForCausalLM:
    """init=0.2 makes greedy streams vary (a wrong state changes them); expert biases random so that the
    bias-for-selection-only rule matters."""
    torch.manual_seed(seed)
    model = LFM2ForCausalLM(get_preset(name).replace(initializer_range=init)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.moe_layers():
            m.expert_bias.copy_(torch.randn(m.expert_bias.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("chunk", [512, 3])
@pytest.mark.parametrize("kernels", KERNELS)
def test_greedy_tokens_equal_reference_with_padding(name: str, chunk: int, kernels: str) -> None:
    model = build(name)
    ref = generate(model, PROMPTS, max_new_tokens=16)
    fast = FastLFM2.from_model(model, prefill_chunk=chunk, kernels=kernels)
    assert fast.use_native == (kernels == "native")
    got = generate(fast, PROMPTS, max_new_tokens=16)
    assert got.tokens == ref.tokens
    assert got.finish_reasons == ref.finish_reasons
    assert all(len(set(t)) > 1 for t in ref.tokens)  # not degenerate streams


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_padded_rows_equal_single_prompts(name: str) -> None:
    fast = FastLFM2.from_model(build(name))
    batch = generate(fast, PROMPTS, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        assert generate(fast, p, max_new_tokens=10).tokens[0] == batch.tokens[i]


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_all_position_logits_match_reference(name: str) -> None:
    model = build(name, init=0.02)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    got = FastLFM2.from_model(model, prefill_chunk=4).logits(ids, mask)
    real = mask.bool()
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref)[real].abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("mode", ["bf16", "int8", "w8a8", "q4_0"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_low_precision_logits_within_tolerance(name: str, mode: str, kernels: str) -> None:
    model = build(name, init=0.02)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32  # quantized modes: fp32 activations
    fast = FastLFM2.from_model(model, dtype=dtype, quant=None if mode == "bf16" else mode, kernels=kernels)
    got = fast.logits(ids, mask)
    real = mask.bool()
    rel = ((got - ref)[real].abs().max() / ref[real].abs().max()).item()
    assert rel <= TOL[(name, mode)], rel
    # decode steps through the bf16 / int8 matrix-vector kernels stay within the same bound
    state = fast.new_state(len(PROMPTS), ids.shape[1] + 1)
    fast.prefill(state, ids, mask)
    step = fast.decode(state, torch.tensor([3, 4, 5]))
    full_ids = torch.cat([ids, torch.tensor([[3], [4], [5]])], dim=1)
    with torch.no_grad():
        ref_step = model(full_ids, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1))[:, -1]
    assert ((step - ref_step).abs().max() / ref_step.abs().max()).item() <= TOL[(name, mode)]


def test_generate_fast_switch_and_sampling() -> None:
    model = build("tiny")
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=1234, repetition_penalty=1.2)
    assert generate(model, PROMPTS, fast=True, **kw).tokens == generate(model, PROMPTS, **kw).tokens
    cfg = SamplingConfig(max_new_tokens=6, stop_token_ids=[7])
    fast = FastLFM2.from_model(model)
    assert fast.generate(PROMPTS, cfg).tokens == generate(model, PROMPTS, cfg).tokens


def test_bf16_model_defaults_to_bf16_fast_path() -> None:
    model = build("tiny", init=0.02).to(torch.bfloat16)
    fast = FastLFM2.from_model(model)
    assert fast.dtype == torch.bfloat16 and fast.layers[0].in_proj.weight.dtype == torch.bfloat16
    ref = generate(model, PROMPTS, max_new_tokens=4)
    assert [len(t) for t in generate(fast, PROMPTS, max_new_tokens=4).tokens] == [len(t) for t in ref.tokens]


@pytest.mark.parametrize("hardware", [True, False])
def test_bf16_prefill_gemm_in_bf16_or_upcast_matches_the_fp32_reference(monkeypatch, hardware) -> None:
    """Prefill GEMMs stay in bf16 on a CPU with bf16 matrix hardware and run in fp32 on upcast operands
    elsewhere; either way the logits are the fp32 model's within bf16 rounding (both accumulate in fp32)."""
    monkeypatch.setattr(native, "bf16_gemm_in_hardware", lambda: hardware)
    model = build("tiny", init=0.02)
    ids = torch.randint(0, model.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).float()
    fast = FastLFM2.from_model(model, dtype=torch.bfloat16, prefill_chunk=64)
    assert all(lin.upcast_gemm is not hardware for lin in fast.layers[0].linears())
    got = fast.logits(ids).float()
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_state_reorder_keeps_rows() -> None:
    model = build("tiny", init=0.02)
    fast = FastLFM2.from_model(model)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    state = fast.new_state(3, ids.shape[1] + 1)
    fast.prefill(state, ids, mask)
    state.reorder(torch.tensor([2, 0]))
    got = fast.decode(state, torch.tensor([9, 9]))
    with torch.no_grad():
        for row, i in enumerate([2, 0]):
            ref = model(torch.tensor([PROMPTS[i] + [9]]))[0, -1]
            assert (got[row] - ref).abs().max().item() <= 1e-5


def test_errors_name_the_problem() -> None:
    fast = FastLFM2.from_model(build("tiny"))
    state = fast.new_state(1, 4)
    with pytest.raises(ValueError, match=r"holds 4 tokens; 0 used, 5 more"):
        fast.prefill(state, torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"batch=1"):
        fast.prefill(state, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        fast.prefill(state, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 2))
    with pytest.raises(ValueError, match="prefill_chunk"):
        FastLFM2.from_model(build("tiny"), prefill_chunk=0)
    with pytest.raises(ValueError, match="float dtype"):
        FastLFM2.from_model(build("tiny"), dtype=torch.int8)
    with pytest.raises(ValueError, match="quant must be None or one of"):
        FastLFM2.from_model(build("tiny"), quant="q2_k")
    with pytest.raises(ValueError, match="contradicts"):
        FastLFM2.from_model(build("tiny"), int8=True, quant="w8a8")


def test_weight_bytes_per_token() -> None:
    model = build("tiny")
    assert FastLFM2.from_model(model).weight_bytes_per_token == 4 * model.num_parameters()
    int8 = FastLFM2.from_model(model, int8=True)
    assert int8.quant == "int8" and int8.int8  # the older spelling
    assert int8.weight_bytes_per_token < 0.3 * 4 * model.num_parameters()  # int8 + fp32 scales, norms, taps
    w8a8 = FastLFM2.from_model(model, quant="w8a8", kernels="torch").weight_bytes_per_token
    assert w8a8 == int8.weight_bytes_per_token
    pure = FastLFM2.from_model(model, quant="q4_0", head_quant="q4_0")
    q4 = pure.weight_bytes_per_token
    assert q4 < 0.6 * w8a8  # 4.5 bits per weight in the projections
    mixed = FastLFM2.from_model(model, quant="q4_0")  # the default keeps the LM head at 8 bits
    assert mixed.head_quant == "w8a8" and isinstance(mixed.head, W8A8Linear) and mixed.embed_q is mixed.head
    assert mixed.weight_bytes_per_token == q4 - pure.head.nbytes + mixed.head.nbytes
    assert FastLFM2.from_model(model, quant="w8a8").head_quant == "w8a8"
    assert isinstance(FastLFM2.from_model(model, quant="q4_0", head_quant=None).head, DenseLinear)
    with pytest.raises(ValueError, match="head_quant"):
        FastLFM2.from_model(model, quant="q4_0", head_quant="q2")


def test_state_bytes_are_kv_plus_conv_window() -> None:
    cfg = get_preset("tiny")
    state = FastLFM2.from_model(build("tiny")).new_state(2, 100)
    kv = 2 * 2 * cfg.num_key_value_heads * 100 * cfg.head_size * 4 * len(cfg.attention_layer_indices)
    conv = 2 * (cfg.conv_L_cache - 1) * cfg.hidden_size * 4 * (cfg.num_hidden_layers - len(cfg.attention_layer_indices))
    assert state.nbytes == kv + conv


# ---------------------------------------------------------------------------------------------- int8
def test_quantize_rowwise_error_is_half_a_step() -> None:
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    q, scale = quantize_rowwise(w)
    assert q.dtype == torch.int8 and scale.shape == (48,)
    assert int(q.abs().max()) == 127
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    with pytest.raises(ValueError, match="2-D"):
        quantize_rowwise(torch.randn(2, 3, 4))


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("hardware", [False, True])
def test_int8_linear_kernels_agree(kernels: str, hardware: bool, monkeypatch) -> None:
    monkeypatch.setattr(native, "bf16_gemm_in_hardware", lambda: hardware)
    w = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    lin = Int8Linear(w, use_native=kernels == "native")
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    exact = x @ lin.dequantize().t()
    decode = lin(x)  # native: fp32 activations; torch: aten._weight_int8pack_mm on bf16 activations
    gemm = lin(x.expand(32, 64))[:1]  # prefill: a GEMM over the dequantized weights
    if hardware:  # bf16 operands: x rounded by at most 2^-9 relative, the dequantized int8 weights exactly
        bound = 2.0**-9 * (x.abs() @ lin.dequantize().abs().t()) + 1e-6
        assert bool(((gemm - exact).abs() <= bound).all())
    else:  # fp32 GEMM
        torch.testing.assert_close(gemm, exact, atol=1e-5, rtol=1e-5)
    if kernels == "native":
        torch.testing.assert_close(decode, exact, atol=1e-5, rtol=1e-5)
    assert ((decode - exact).abs().max() / exact.abs().max()).item() < 0.02


@pytest.mark.parametrize("kernels", KERNELS)
def test_w8a8_padded_rows_equal_single_prompts(kernels: str) -> None:
    """Activations are quantized per token, so a row's numbers do not depend on its batch neighbours, and
    prefill (integer GEMM) and decode (integer matrix-vector) compute the same integers."""
    fast = FastLFM2.from_model(build("tiny"), quant="w8a8", kernels=kernels)
    batch = generate(fast, PROMPTS, max_new_tokens=10)
    for i, p in enumerate(PROMPTS):
        assert generate(fast, p, max_new_tokens=10).tokens[0] == batch.tokens[i]
