"""Batched generation over the preallocated cache: one prefill, then O(1)-state decode steps.

Prompts of different lengths are left-padded; the model's layout masks padding in attention and in the
convolution, so each row produces exactly what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import LFM2ForCausalLM
from .fast import FastLFM2
from .sampling import SamplingConfig, select_next


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated ids per prompt (stop token included when one was hit)
    finish_reasons: list[str]  # "stop" or "length"
    prompt_lengths: list[int]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T) and attention mask (B, T), padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt and every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return ids.to(device), mask.to(device)


class _Stepper:
    """Prefill/decode over either backend: the training model's cache or the fast path's state."""

    def __init__(self, model: LFM2ForCausalLM | FastLFM2, batch_size: int, max_length: int) -> None:
        self.model = model
        if isinstance(model, FastLFM2):
            self.state: object = model.new_state(batch_size, max_length)
        else:
            self.state = model.new_cache(batch_size, max_length)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, FastLFM2):
            return self.model.prefill(self.state, ids, mask)  # type: ignore[arg-type]
        return self.model(ids, attention_mask=mask, cache=self.state, logits_to_keep=1)[:, -1].float()

    def decode(self, nxt: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, FastLFM2):
            return self.model.decode(self.state, nxt)  # type: ignore[arg-type]
        return self.model(nxt[:, None], cache=self.state)[:, -1].float()


@torch.inference_mode()
def generate(
    model: LFM2ForCausalLM | FastLFM2,
    prompts: list[list[int]] | list[int],
    cfg: SamplingConfig | None = None,
    *,
    fast: bool = False,
    **overrides: object,
) -> GenerationOutput:
    """Generate continuations for one prompt (a list of ids) or several (a list of lists).

    `fast=True` runs the fast CPU path (`FastLFM2.from_model(model)`, same dtype) instead of the training
    model; passing a prebuilt `FastLFM2` as `model` does the same without re-laying out the weights per call.
    """
    if fast and not isinstance(model, FastLFM2):
        model = FastLFM2.from_model(model)
    cfg = cfg or SamplingConfig()
    if overrides:
        cfg = SamplingConfig(**{**cfg.__dict__, **overrides})
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # type: ignore[list-item]
    prompts = [list(p) for p in prompts]  # type: ignore[union-attr]
    config = model.config
    device = model.device if isinstance(model, FastLFM2) else model.model.embed_tokens.weight.device
    ids, mask = left_pad(prompts, config.pad_token_id, device)
    B, T = ids.shape
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool())

    stepper = _Stepper(model, B, T + max(cfg.max_new_tokens, 1))
    stop = torch.tensor(sorted(set(cfg.stop_token_ids)), dtype=torch.long, device=device)
    out = torch.full((B, cfg.max_new_tokens), config.pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_generated = torch.zeros(B, dtype=torch.long, device=device)

    logits = stepper.prefill(ids, mask)
    for step in range(cfg.max_new_tokens):
        nxt = select_next(logits, cfg, seen, generator)
        nxt = torch.where(done, torch.full_like(nxt, config.pad_token_id), nxt)
        out[:, step] = nxt
        n_generated += (~done).long()
        if seen is not None:
            seen.scatter_(1, nxt[:, None], ~done[:, None])
        if stop.numel():
            done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == cfg.max_new_tokens - 1:
            break
        logits = stepper.decode(nxt)

    tokens, reasons = [], []
    for i in range(B):
        row = out[i, : int(n_generated[i])].tolist()
        hit_stop = bool(row) and row[-1] in set(cfg.stop_token_ids)
        tokens.append(row)
        reasons.append("stop" if hit_stop else "length")
    return GenerationOutput(tokens=tokens, finish_reasons=reasons, prompt_lengths=[len(p) for p in prompts])
