"""Greedy decode of the quantized fast path against fp32 on a small trained model.

A model trained for a few dozen steps on templated arithmetic text has peaked next-token distributions, as
real checkpoints do (random-init models have near-ties everywhere and say little about quantization). The
fp32 fast path decodes 64 greedy tokens from each prompt; each quantized mode then decodes the same streams
(teacher-forced, so one disagreement does not derail the rest) and must pick the same argmax at >= the
floor below. Measured on the development machine: int8 256/256, w8a8 256/256, q4_0 (its default 8-bit head)
256/256, q4_0 with a 4-bit head too (`head_quant="q4_0"`, as llama.cpp's `--pure`) 241-242/256 (94%).
"""

from __future__ import annotations

import random

import pytest
import torch

from lfm2_train.inference.fast import FastLFM2
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

STEPS = 64
FLOOR = {"int8": 0.95, "w8a8": 0.95, "q4_0": 0.95, "q4_0 pure": 0.88}


def _text(rng: random.Random) -> str:
    a, b = rng.randrange(50), rng.randrange(50)
    return f"{a} + {b} = {a + b}. The fox jumps over {a} lazy dogs."


@pytest.fixture(scope="module")
def trained() -> tuple[LFM2ForCausalLM, list[list[int]]]:
    """The tiny preset after 40 AdamW steps on ~20k tokens (loss about 0.55), and 4 held-out prompts."""
    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    rng = random.Random(0)
    ids: list[int] = []
    for _ in range(600):
        ids += tok.encode(_text(rng)) + [tok.eod_token_id]
    data = torch.tensor(ids)
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    T, B = 48, 8
    for _ in range(40):
        starts = torch.randint(0, len(ids) - T - 1, (B,)).tolist()
        batch = torch.stack([data[s: s + T + 1] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0  # it learned the template
    return model.eval(), [tok.encode(_text(rng))[:6] for _ in range(4)]


def _stream(fast: FastLFM2, prompt: list[int], forced: list[int] | None = None) -> list[int]:
    """Greedy argmax at each of STEPS decode steps; with `forced`, those tokens are fed instead."""
    state = fast.new_state(1, len(prompt) + STEPS + 1)
    logits = fast.prefill(state, torch.tensor([prompt]))
    out = []
    for t in range(STEPS):
        out.append(int(logits.argmax(-1)))
        logits = fast.decode(state, torch.tensor([forced[t] if forced is not None else out[-1]]))
    return out


@pytest.mark.parametrize("mode", sorted(FLOOR))
def test_quantized_greedy_tokens_agree_with_fp32(trained: tuple[LFM2ForCausalLM, list[list[int]]],
                                                 mode: str) -> None:
    model, prompts = trained
    reference = FastLFM2.from_model(model)
    streams = [_stream(reference, p) for p in prompts]
    assert all(len(set(s)) > 5 for s in streams)  # real text, not a repeated token
    quant, _, pure = mode.partition(" ")
    quantized = FastLFM2.from_model(model, quant=quant, head_quant=quant if pure else "auto")
    agree = sum(a == b for p, s in zip(prompts, streams) for a, b in zip(_stream(quantized, p, s), s))
    assert agree / (STEPS * len(prompts)) >= FLOOR[mode], f"{mode}: {agree}/{STEPS * len(prompts)}"
