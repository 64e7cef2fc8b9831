"""Chat arithmetic accuracy: the bundled verifiable task, generated from a seed (nothing to download)."""

from __future__ import annotations

from typing import Any

from ..model import LFM2ForCausalLM
from ..tasks import make_problems, verify
from ..tokenizer import LFM2Tokenizer
from .runner import Runner, make_runner


def chat_prompt(tokenizer: LFM2Tokenizer, text: str) -> list[int]:
    """A single user turn followed by the assistant header, as the SFT data formats it."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)


def stop_ids(tokenizer: LFM2Tokenizer, model: LFM2ForCausalLM | None = None) -> list[int]:
    """`<|im_end|>` (end of turn), the document separator, and the model's own eos."""
    stops = {tokenizer.eos_token_id}
    if tokenizer.eod_token_id is not None:
        stops.add(tokenizer.eod_token_id)
    if model is not None and model.config.eos_token_id is not None:
        stops.add(int(model.config.eos_token_id))
    return sorted(stops)


def arithmetic_accuracy(model: LFM2ForCausalLM, tokenizer: LFM2Tokenizer, n: int = 64, seed: int = 0,
                        levels: tuple[int, ...] | None = None, max_new_tokens: int = 24, batch_size: int = 16,
                        runner: Runner | None = None) -> dict[str, Any]:
    """Greedy chat answers to `make_problems(n, seed, levels)`, scored with `tasks.verify`.

    -> {"accuracy": correct / n, "n": n, "correct": correct}. Prompts are left-padded in batches of
    `batch_size`; generation stops at `<|im_end|>`.
    """
    if n < 1:
        raise ValueError(f"arithmetic_accuracy: n must be >= 1, got {n}")
    runner = runner or make_runner(model, batch_size=batch_size)
    problems = make_problems(n, seed, tuple(levels) if levels is not None else None)
    prompts = [chat_prompt(tokenizer, p.question) for p in problems]
    outputs = runner.generate(prompts, max_new_tokens, stop_ids(tokenizer, model))
    correct = sum(verify(tokenizer.decode(ids, skip_special_tokens=True), p.answer)
                  for ids, p in zip(outputs, problems))
    return {"accuracy": correct / n, "n": n, "correct": int(correct)}
