"""The decode loop both inference paths share: left-pad the prompts, prefill once, then one token per step.

A backend is anything with `config`, `device`, `new_state(batch_size, max_length)`, `prefill(state, ids,
attention_mask)` and `decode(state, ids)`, the last two returning fp32 logits of the last position (B, V).
The fast path (`fast.FastLFM2`) is one as it stands; `generate.py` adapts the training model to it. Keeping the
loop here, below both, is what lets `FastLFM2.generate` and `inference.generate` share it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..model import LFM2Config
from .sampling import SamplingConfig, select_next


class DecodeBackend(Protocol):
    config: LFM2Config
    device: torch.device

    def new_state(self, batch_size: int, max_length: int) -> Any: ...

    def prefill(self, state: Any, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def decode(self, state: Any, ids: torch.Tensor) -> torch.Tensor: ...


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


@torch.inference_mode()
def run_generation(backend: DecodeBackend, prompts: list[list[int]] | list[int], cfg: SamplingConfig | None = None,
                   **overrides: object) -> GenerationOutput:
    """Continuations of one prompt (a list of ids) or several (a list of lists) on `backend`; `overrides` replace
    fields of `cfg`."""
    cfg = cfg or SamplingConfig()
    if overrides:
        cfg = SamplingConfig(**{**cfg.__dict__, **overrides})
    if prompts and isinstance(prompts[0], int):
        prompts = [prompts]  # type: ignore[list-item]
    prompts = [list(p) for p in prompts]  # type: ignore[union-attr]
    config = backend.config
    device = backend.device
    ids, mask = left_pad(prompts, config.pad_token_id, device)
    B, T = ids.shape
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)

    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, mask.bool())

    state = backend.new_state(B, T + max(cfg.max_new_tokens, 1))
    stop = torch.tensor(sorted(set(cfg.stop_token_ids)), dtype=torch.long, device=device)
    out = torch.full((B, cfg.max_new_tokens), config.pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n_generated = torch.zeros(B, dtype=torch.long, device=device)

    logits = backend.prefill(state, ids, mask)
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
        logits = backend.decode(state, nxt)

    tokens, reasons = [], []
    for i in range(B):
        row = out[i, : int(n_generated[i])].tolist()
        hit_stop = bool(row) and row[-1] in set(cfg.stop_token_ids)
        tokens.append(row)
        reasons.append("stop" if hit_stop else "length")
    return GenerationOutput(tokens=tokens, finish_reasons=reasons, prompt_lengths=[len(p) for p in prompts])
