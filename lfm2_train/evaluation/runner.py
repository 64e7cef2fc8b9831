"""The two operations every evaluation needs from a model, behind one small interface.

Generation tasks need "continue these prompts greedily until a stop token"; multiple-choice tasks and the
lm-evaluation-harness adapter need "log-probability of this continuation after that context". Tasks talk
only to a `Runner`, so a faster implementation of either operation (the fast CPU inference path) is a
drop-in: write a class with the same two methods and register it in `RUNNERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from ..inference import SamplingConfig, generate
from ..inference.fast import FastLFM2
from ..model import LFM2ForCausalLM


class Runner(Protocol):
    """What tasks call. `model` is exposed for metadata (config, parameter count) only."""

    model: LFM2ForCausalLM

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: Sequence[int]
                 ) -> list[list[int]]:
        """Greedy continuations (stop token included when hit), one list of ids per prompt."""
        ...

    def loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): (sum of log p(continuation | context), whether
        every continuation token is the argmax)."""
        ...


class ReferenceRunner:
    """The reference path: `lfm2_train.inference.generate` and plain full forwards for scoring."""

    def __init__(self, model: LFM2ForCausalLM, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"runner batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size

    @property
    def max_length(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_token_ids: Sequence[int]
                 ) -> list[list[int]]:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                  stop_token_ids=sorted(set(int(t) for t in stop_token_ids)))
        keep = max(self.max_length - max_new_tokens, 1)
        out: list[list[int]] = []
        with _eval_mode(self.model):
            for start in range(0, len(prompts), self.batch_size):
                chunk = [list(p)[-keep:] for p in prompts[start:start + self.batch_size]]
                out.extend(generate(self._generator(), chunk, sampling).tokens)
        return out

    def _generator(self) -> LFM2ForCausalLM | FastLFM2:
        return self.model

    @torch.inference_mode()
    def loglikelihood(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first: rows in a batch have similar lengths, so little compute goes to padding.
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
        with _eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                for i, r in zip(idx, self._score_batch([requests[i] for i in idx])):
                    results[i] = r
        return results  # type: ignore[return-value]

    def _score_batch(self, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows, spans = [], []
        for ctx, cont in requests:
            if not cont:
                raise ValueError("loglikelihood: a continuation is empty (nothing to score)")
            if not ctx:
                raise ValueError("loglikelihood: a context is empty; start it with the bos token")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]  # keep the continuation, cut the context
            rows.append(full[:-1])
            spans.append(len(cont))
        T = max(len(r) for r in rows)
        device = self.model.model.embed_tokens.weight.device
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        docs = torch.full((len(rows), T), -1, dtype=torch.long)  # right padding: a negative document id
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            docs[i, :len(r)] = 0
        # The head only on the continuation positions: (B, T, V) logits would not fit for long contexts.
        hidden, head = self.model(ids.to(device), doc_ids=docs.to(device), head_fn=lambda h, w: (h, w))  # (B, T, d)
        out = []
        for i, (_, cont) in enumerate(requests):
            n, L = spans[i], len(rows[i])
            target = torch.tensor(list(cont), device=device)  # (n,)
            logp = F.log_softmax(F.linear(hidden[i, L - n:L], head).float(), dim=-1)  # (n, V)
            total = float(logp.gather(-1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            out.append((total, greedy))
        return out


class _eval_mode:
    """Eval mode for the duration of a block, restoring the caller's train/eval state after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


class FastRunner(ReferenceRunner):
    """Generation through the fast CPU path (`inference/fast.py`, weights laid out once per runner; greedy
    tokens equal the reference path's in fp32); log-likelihood scoring as the reference path."""

    def __init__(self, model: LFM2ForCausalLM, batch_size: int = 16, quant: str | None = None) -> None:
        super().__init__(model, batch_size)
        self.fast = FastLFM2.from_model(model, quant=quant)  # quant: generation runs on the quantized weights

    def _generator(self) -> FastLFM2:
        return self.fast


# name -> factory(model, batch_size)
RUNNERS: dict[str, Callable[[LFM2ForCausalLM, int], Runner]] = {"reference": ReferenceRunner, "fast": FastRunner}


def make_runner(model: LFM2ForCausalLM, kind: str = "reference", batch_size: int = 16,
                quant: str | None = None) -> Runner:
    """`quant` (int8 | w8a8 | q4_0) quantizes the fast runner's weights: what a quantized deployment scores."""
    if kind not in RUNNERS:
        raise ValueError(f"unknown runner {kind!r}; available: {sorted(RUNNERS)}")
    if quant is None:
        return RUNNERS[kind](model, batch_size)
    if kind != "fast":
        raise ValueError(f"stage.quant={quant} runs on the fast CPU path: set stage.runner=fast (not {kind!r})")
    return FastRunner(model, batch_size, quant=quant)
