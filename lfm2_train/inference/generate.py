"""Batched generation over the preallocated cache: one prefill, then O(1)-state decode steps.

Prompts of different lengths are left-padded; the model's layout masks padding in attention and in the
convolution, so each row produces exactly what it would alone. The loop itself is `decoding.run_generation`;
this module picks the backend: the training model over its `InferenceCache`, or the fast CPU path.
"""

from __future__ import annotations

import torch

from ..model import InferenceCache, LFM2ForCausalLM
from .decoding import GenerationOutput, run_generation
from .fast import FastLFM2
from .sampling import SamplingConfig


class _CacheBackend:
    """The training model as a decode backend: its `InferenceCache` is the state."""

    def __init__(self, model: LFM2ForCausalLM) -> None:
        self.model = model
        self.config = model.config
        self.device = model.model.embed_tokens.weight.device

    def new_state(self, batch_size: int, max_length: int) -> InferenceCache:
        return self.model.new_cache(batch_size, max_length)

    def prefill(self, state: InferenceCache, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, attention_mask=attention_mask, cache=state, logits_to_keep=1)[:, -1].float()

    def decode(self, state: InferenceCache, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids[:, None], cache=state)[:, -1].float()


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
    backend = model if isinstance(model, FastLFM2) else _CacheBackend(model)
    return run_generation(backend, prompts, cfg, **overrides)

