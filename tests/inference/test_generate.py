"""Generation over the inference cache: cached == full recompute, left-padded batches == single prompts,
stop tokens / max_new_tokens, cache capacity, and the sampling filters against hand-computed examples
and `transformers`' logits processors."""

from __future__ import annotations

import math

import pytest
import torch

from lfm2_train.inference import GenerationOutput, SamplingConfig, filter_logits, generate, left_pad, select_next
from lfm2_train.inference.sampling import apply_repetition_penalty
from lfm2_train.model import InferenceCache, LFM2ForCausalLM, get_preset

ATOL = 1e-5


def build(name: str = "tiny", seed: int = 0, init: float = 0.2, **changes) -> LFM2ForCausalLM:
    """With the default init (0.02) a tied tiny model just repeats its last token; init=0.2 makes the mixers
    matter, so greedy streams vary and a wrong cache changes them. Tests that compare logits to 1e-5 use
    the default 0.02 (logits of order 0.1, so 1e-5 is a tight relative bound)."""
    cfg = get_preset(name).replace(initializer_range=init, **changes)
    torch.manual_seed(seed)
    model = LFM2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.moe_layers():
            m.expert_bias.copy_(torch.randn(m.expert_bias.shape, generator=g) * 0.3)
    return model


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(1, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def full_recompute_greedy(model: LFM2ForCausalLM, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


# ---------------------------------------------------------------------------------------------- cache == recompute
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_cached_greedy_equals_full_recompute(name: str) -> None:
    model = build(name)
    p = prompt(6)
    out = generate(model, p, max_new_tokens=12)
    assert isinstance(out, GenerationOutput)
    assert out.prompt_lengths == [6] and out.finish_reasons == ["length"]
    assert out.tokens[0] == full_recompute_greedy(model, p, 12)
    assert len(set(out.tokens[0])) > 1  # not a degenerate constant stream


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("prompt_len", [1, 2, 7])
def test_cached_logits_equal_full_forward(name: str, backend: str, prompt_len: int) -> None:
    model = build(name, attn_implementation=backend, init=0.02)
    seq = prompt(prompt_len, seed=prompt_len)
    steps = 10
    cache = model.new_cache(1, prompt_len + steps)
    with torch.no_grad():
        logits = model(torch.tensor([seq]), cache=cache)
        full = model(torch.tensor([seq]))
        assert (logits - full).abs().max().item() <= ATOL
        for i in range(steps):
            nxt = int(logits[0, -1].argmax())
            seq.append(nxt)
            logits = model(torch.tensor([[nxt]]), cache=cache)
            full = model(torch.tensor([seq]))[:, -1:]
            assert (logits - full).abs().max().item() <= ATOL, f"step {i}"
    assert cache.length == prompt_len + steps
    assert int(cache.next_position[0]) == prompt_len + steps


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("split", [1, 2, 5])
def test_chunked_prefill_equals_single_prefill(name: str, split: int) -> None:
    model = build(name, init=0.02)
    seq = torch.tensor([prompt(9, seed=3)])
    with torch.no_grad():
        full = model(seq)
        cache = model.new_cache(1, 12)
        first = model(seq[:, :split], cache=cache)
        second = model(seq[:, split:], cache=cache)
    assert (torch.cat([first, second], dim=1) - full).abs().max().item() <= ATOL


def test_logits_to_keep_with_cache() -> None:
    model = build(init=0.02)
    seq = torch.tensor([prompt(5)])
    with torch.no_grad():
        last = model(seq, cache=model.new_cache(1, 5), logits_to_keep=1)
        full = model(seq)
    assert last.shape == (1, 1, 512)
    assert (last[:, 0] - full[:, -1]).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------------- batching
PROMPTS = [prompt(3, seed=10), prompt(9, seed=11), prompt(1, seed=12)]


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_left_padded_batch_equals_single_runs(name: str) -> None:
    model = build(name)
    batch = generate(model, PROMPTS, max_new_tokens=10)
    assert batch.prompt_lengths == [3, 9, 1]
    for i, p in enumerate(PROMPTS):
        single = generate(model, p, max_new_tokens=10)
        assert batch.tokens[i] == single.tokens[0], f"row {i}"
        assert batch.tokens[i] == full_recompute_greedy(model, p, 10)
    assert batch.finish_reasons == ["length"] * 3


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_left_padded_cached_logits_equal_single_runs(name: str) -> None:
    """Padded prefill, then a 2-token chunk, then single-token decode steps: every row's logits equal the
    unpadded full forward of that row."""
    model = build(name, init=0.02)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    feeds = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]])
    cache = model.new_cache(3, ids.shape[1] + feeds.shape[1])
    with torch.no_grad():
        outs = [model(ids, attention_mask=mask, cache=cache)[:, -1:]]
        outs.append(model(feeds[:, :2], cache=cache))
        for s in range(2, feeds.shape[1]):
            outs.append(model(feeds[:, s:s + 1], cache=cache))
        got_all = torch.cat(outs, dim=1)  # (3, 1 + steps, V)
        for i, p in enumerate(PROMPTS):
            ref = model(torch.tensor([p + feeds[i].tolist()]))[0, len(p) - 1:]
            assert (got_all[i] - ref).abs().max().item() <= ATOL, f"row {i}"
    assert cache.next_position.tolist() == [len(p) + feeds.shape[1] for p in PROMPTS]


def test_left_pad() -> None:
    ids, mask = left_pad([[5, 6], [7], [1, 2, 3]], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [0, 0, 7], [1, 2, 3]]
    assert mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], pad_id=0)
    with pytest.raises(ValueError):
        left_pad([], pad_id=0)


# ---------------------------------------------------------------------------------------------- stopping / lengths
def test_stop_token_ends_row_early_others_continue() -> None:
    model = build()
    free = generate(model, PROMPTS, max_new_tokens=10)
    # pick a token that row 0 produces (first occurrence at index k > 0) and the other rows never produce
    others = set(free.tokens[1]) | set(free.tokens[2])
    candidates = [(k, t) for k, t in enumerate(free.tokens[0]) if k > 0 and t not in others
                  and t not in free.tokens[0][:k]]
    assert candidates, "seed gives no usable stop token; change the prompts"
    k, stop = candidates[0]
    out = generate(model, PROMPTS, max_new_tokens=10, stop_token_ids=[stop])
    assert out.tokens[0] == free.tokens[0][:k + 1]
    assert out.tokens[0][-1] == stop
    assert out.finish_reasons == ["stop", "length", "length"]
    assert out.tokens[1] == free.tokens[1] and out.tokens[2] == free.tokens[2]


def test_all_rows_stop() -> None:
    model = build()
    free = generate(model, PROMPTS, max_new_tokens=6)
    stops = [free.tokens[0][1], free.tokens[1][0], free.tokens[2][2]]
    out = generate(model, PROMPTS, max_new_tokens=6, stop_token_ids=stops)
    assert out.finish_reasons == ["stop"] * 3
    for row, free_row in zip(out.tokens, free.tokens):
        first = next(i for i, t in enumerate(free_row) if t in stops)
        assert row == free_row[:first + 1]


@pytest.mark.parametrize("n", [0, 1, 4])
def test_max_new_tokens(n: int) -> None:
    model = build()
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=n))
    assert [len(t) for t in out.tokens] == [n] * 3
    assert out.finish_reasons == ["length"] * 3


def test_overrides_and_single_prompt_form() -> None:
    model = build()
    cfg = SamplingConfig(max_new_tokens=3)
    a = generate(model, PROMPTS[0], cfg)
    b = generate(model, [PROMPTS[0]], cfg, max_new_tokens=5)
    assert len(a.tokens) == 1 and len(a.tokens[0]) == 3
    assert b.tokens[0][:3] == a.tokens[0] and len(b.tokens[0]) == 5
    assert cfg.max_new_tokens == 3  # overrides do not mutate the caller's config
    with pytest.raises(TypeError):
        generate(model, PROMPTS[0], not_a_field=1)


def test_cache_capacity_error_is_clear() -> None:
    model = build()
    cache = model.new_cache(1, 4)
    assert isinstance(cache, InferenceCache)
    with pytest.raises(ValueError, match=r"holds 4 tokens.*0 used.*5 more"):
        model(torch.tensor([prompt(5)]), cache=cache)
    cache = model.new_cache(1, 4)
    with torch.no_grad():
        model(torch.tensor([prompt(4)]), cache=cache)
        with pytest.raises(ValueError, match=r"holds 4 tokens.*4 used.*1 more"):
            model(torch.tensor([[3]]), cache=cache)


def test_packed_docs_with_cache_are_rejected() -> None:
    model = build()
    with pytest.raises(ValueError, match="packed"):
        model(torch.tensor([[1, 2, 3, 4]]), doc_ids=torch.tensor([[0, 0, 1, 1]]), cache=model.new_cache(1, 8))


def test_cache_reorder_keeps_rows() -> None:
    model = build(init=0.02)
    ids, mask = left_pad(PROMPTS, pad_id=0)
    cache = model.new_cache(3, ids.shape[1] + 2)
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        cache.reorder(torch.tensor([2, 0]))
        got = model(torch.tensor([[9], [9]]), cache=cache)[:, -1]
        for row, i in enumerate([2, 0]):
            ref = model(torch.tensor([PROMPTS[i] + [9]]))[0, -1]
            assert (got[row] - ref).abs().max().item() <= ATOL
    assert cache.batch_size == 2


def test_generate_does_not_touch_expert_load_in_train_mode() -> None:
    model = build("tiny-moe").train()
    generate(model, PROMPTS, max_new_tokens=3)
    assert model.training  # the caller's mode is preserved
    assert [m.expert_load.sum().item() for m in model.moe_layers()] == [0.0] * 3


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed() -> None:
    model = build()
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    a = generate(model, PROMPTS, **kw)
    b = generate(model, PROMPTS, **kw)
    c = generate(model, PROMPTS, **{**kw, "seed": 99})
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_top_k_1_sampling_equals_greedy(name: str) -> None:
    model = build(name)
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    sampled = generate(model, PROMPTS, max_new_tokens=8, temperature=1.3, top_k=1, seed=7)
    assert sampled.tokens == greedy.tokens


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1), -1e9]]).expand(4000, 4)
    cfg = SamplingConfig(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    draws = select_next(logits.contiguous(), cfg, None, g)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    assert freq[3] == 0
    torch.testing.assert_close(freq[:3], torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_greedy_select_next_is_argmax() -> None:
    logits = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
    assert torch.equal(select_next(logits, SamplingConfig(), None, None), logits.argmax(-1))


def _kept(logits: torch.Tensor) -> list[bool]:
    return torch.isfinite(logits[0]).tolist()


PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.8, [True, True, False, False]), (0.75, [True, True, False, False]), (0.5, [True, False, False, False]),
     (0.3, [True, False, False, False]), (0.9, [True, True, True, False]), (1.0, [True, True, True, True])],
)
def test_top_p_hand_computed(top_p: float, kept: list[bool]) -> None:
    out = filter_logits(PROBS.log(), SamplingConfig(temperature=1.0, top_p=top_p))
    assert _kept(out) == kept
    torch.testing.assert_close(out[torch.isfinite(out)], PROBS.log()[0][torch.tensor(kept)])


def test_top_p_is_order_independent() -> None:
    perm = torch.tensor([2, 0, 3, 1])
    out = filter_logits(PROBS[:, perm].log(), SamplingConfig(temperature=1.0, top_p=0.8))
    assert _kept(out) == [False, True, False, True]


@pytest.mark.parametrize(
    "min_p, kept",
    [(0.4, [True, True, False, False]), (0.25, [True, True, True, False]), (0.7, [True, False, False, False]),
     (0.05, [True, True, True, True])],
)
def test_min_p_hand_computed(min_p: float, kept: list[bool]) -> None:
    # min_p=0.4: threshold 0.4 * 0.5 = 0.2 -> keep p >= 0.2
    assert _kept(filter_logits(PROBS.log(), SamplingConfig(temperature=1.0, min_p=min_p))) == kept


@pytest.mark.parametrize("top_k, kept", [(1, [True, False, False, False]), (3, [True, True, True, False]),
                                         (4, [True] * 4), (10, [True] * 4)])
def test_top_k_hand_computed(top_k: int, kept: list[bool]) -> None:
    assert _kept(filter_logits(PROBS.log(), SamplingConfig(temperature=1.0, top_k=top_k))) == kept


def test_temperature_scales_logits_before_filters() -> None:
    logits = PROBS.log()
    out = filter_logits(logits, SamplingConfig(temperature=2.0))
    torch.testing.assert_close(out, logits / 2.0)
    # at T=0.25 the distribution sharpens: p ∝ p^4 -> 0.5^4 / sum ... keeps fewer under the same top_p
    sharp = filter_logits(logits, SamplingConfig(temperature=0.25, top_p=0.8))
    assert _kept(sharp) == [True, False, False, False]


def test_filters_combine_in_order() -> None:
    # top-p alone at 0.6 keeps [0.5, 0.3] (mass before 0.3 is 0.5 < 0.6) ...
    assert _kept(filter_logits(PROBS.log(), SamplingConfig(temperature=1.0, top_p=0.6))) == [True, True, False, False]
    # ... but after top-k=2 the survivors renormalise to [0.625, 0.375], so top-p 0.6 keeps only the first
    out = filter_logits(PROBS.log(), SamplingConfig(temperature=1.0, top_k=2, top_p=0.6))
    assert _kept(out) == [True, False, False, False]
    # min-p is relative to the max, so renormalising does not change it: 0.5 * 0.526 = 0.263 keeps 0.316
    out = filter_logits(PROBS.log(), SamplingConfig(temperature=1.0, top_k=3, top_p=0.9, min_p=0.5))
    assert _kept(out) == [True, True, False, False]


def test_filters_match_transformers_warpers() -> None:
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(8, 1, dtype=torch.long)
    for temperature, top_k, top_p, min_p in [(1.0, 20, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.1),
                                             (0.9, 40, 0.8, 0.05)]:
        ref = TemperatureLogitsWarper(temperature)(ids, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(ids, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(ids, ref)
        if min_p:
            ref = MinPLogitsWarper(min_p)(ids, ref)
        ours = filter_logits(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref)), (temperature, top_k, top_p, min_p)
        torch.testing.assert_close(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])


def test_repetition_penalty_matches_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 512, generator=g) * 2
    input_ids = torch.randint(0, 512, (4, 30), generator=g)
    seen = torch.zeros(4, 512, dtype=torch.bool).scatter_(1, input_ids, True)
    for penalty in (1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), ref, atol=0, rtol=0)
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_in_generate_matches_reference_loop() -> None:
    model = build()
    p = PROMPTS[1]
    n, penalty = 10, 2.0
    out = generate(model, p, max_new_tokens=n, repetition_penalty=penalty)
    seq = list(p)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[:, -1]
            seen = torch.zeros(1, 512, dtype=torch.bool)
            seen[0, seq] = True
            seq.append(int(apply_repetition_penalty(logits, seen, penalty).argmax()))
    assert out.tokens[0] == seq[len(p):]


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", -1), ("temperature", -0.5), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
     ("min_p", 1.0), ("min_p", -0.1), ("repetition_penalty", 0.0)],
)
def test_invalid_sampling_config_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=rf"SamplingConfig\.{field}\b"):
        SamplingConfig(**{field: value})


def test_sampling_config_defaults_are_greedy() -> None:
    cfg = SamplingConfig()
    assert cfg.greedy and cfg.max_new_tokens == 64 and cfg.stop_token_ids == []
    assert not SamplingConfig(temperature=0.5).greedy
