"""lm-evaluation-harness adapter: `LFM2LM`, registered as model `lfm2_train`.

Needs the `eval` extra (`pip install -e .[eval]`). The adapter turns the harness's text requests into
token requests for a `Runner` (the same code `stage=eval` uses), so harness scores and our own
multiple-choice / generation scores come from one implementation.

    python -m lfm2_train.evaluation.harness --model lfm2_train --model_args pretrained=<ckpt dir> \
        --tasks <task> [--include_path <dir of task YAMLs>]

or `stage=eval` with a task `{kind: lm_eval, tasks: [...], include_path: ...}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the lm-evaluation-harness adapter needs the `eval` extra: pip install -e '.[eval]'") from e

from ..model import LFM2ForCausalLM
from ..tokenizer import LFM2Tokenizer
from .arithmetic import stop_ids
from .runner import Runner, make_runner

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@register_model("lfm2_train", "lfm2")
class LFM2LM(LM):
    """Our checkpoints (or an in-memory model) as a harness `LM`. Greedy generation only."""

    def __init__(self, pretrained: str | None = None, model: LFM2ForCausalLM | None = None,
                 tokenizer: LFM2Tokenizer | str | None = None, batch_size: int | str = 16,
                 max_length: int | None = None, dtype: str = "float32", runner: Runner | str = "reference",
                 **_: Any) -> None:
        super().__init__()
        import torch

        if model is None:
            if not pretrained:
                raise ValueError("LFM2LM needs pretrained=<checkpoint dir> or model=<LFM2ForCausalLM>")
            if dtype not in _DTYPES:
                raise ValueError(f"LFM2LM dtype={dtype!r}; choose one of {sorted(_DTYPES)}")
            model = LFM2ForCausalLM.from_pretrained(pretrained, dtype=getattr(torch, _DTYPES[dtype]))
        if tokenizer is None:
            if not pretrained or not (Path(pretrained) / "tokenizer.json").is_file():
                raise ValueError("LFM2LM needs tokenizer=<dir> when the checkpoint has no tokenizer.json")
            tokenizer = pretrained
        if not isinstance(tokenizer, LFM2Tokenizer):
            tokenizer = LFM2Tokenizer.from_pretrained(tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer
        bs = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.runner = runner if not isinstance(runner, str) else make_runner(model, runner, bs)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self._device = model.model.embed_tokens.weight.device

    # ------------------------------------------------------------------------------ tokenization
    def _context_ids(self, context: str) -> list[int]:
        """bos + context; a chat-templated context already starts with the bos string."""
        ids = self.tokenizer.encode(context)
        if ids[:1] == [self.tokenizer.bos_token_id]:
            return ids
        return [self.tokenizer.bos_token_id, *ids]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation), tokenized together so merges across the seam match what
        the model saw in training; trailing context spaces move to the continuation (as the harness's
        own HF model does)."""
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self._context_ids(context + continuation)
        ctx = self._context_ids(context) if context else [self.tokenizer.bos_token_id]
        return whole[:len(ctx)], whole[len(ctx):]

    # ------------------------------------------------------------------------------ LM API
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [self._split(*r.args) for r in requests]
        out = self.runner.loglikelihood(pairs)
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        results = []
        for r in requests:
            tokens = self.tokenizer.encode(r.args[0])
            pairs = []
            for inp, pred in get_rolling_token_windows(tokens, self.tokenizer.bos_token_id, self.max_length, 1):
                full = [*inp, pred[-1]]  # the window's inputs plus its last target
                pairs.append((full[:-len(pred)], list(pred)))
            total = sum(ll for ll, _ in self.runner.loglikelihood(pairs)) if pairs else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), total)
            results.append(total)
        return results

    def generate_until(self, requests: list[Any]) -> list[str]:
        # Requests with the same settings are generated together (left-padded batches).
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        parsed = []
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("LFM2LM generates greedily only; drop do_sample / temperature from the task")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            parsed.append((context, until))
            groups.setdefault((max_new, tuple(until)), []).append(i)
        out: list[str] = [""] * len(requests)
        stops = stop_ids(self.tokenizer, self.model)
        for (max_new, until), idx in groups.items():
            prompts = [self._context_ids(parsed[i][0]) for i in idx]
            for i, ids in zip(idx, self.runner.generate(prompts, max_new, stops)):
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                cut = min((text.find(s) for s in until if s and s in text), default=-1)
                out[i] = text[:cut] if cut >= 0 else text
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    # ------------------------------------------------------------------------------ chat
    @property
    def tokenizer_name(self) -> str:
        return f"lfm2_train-{self.tokenizer.fingerprint()[:16]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)


def evaluate_tasks(lm: LFM2LM, tasks: list[str], include_path: str | None = None, num_fewshot: int | None = None,
                   limit: int | None = None, apply_chat_template: bool = False
                   ) -> dict[str, tuple[dict[str, float], int]]:
    """Run harness tasks -> {task: ({metric: value}, examples)}; stderr entries are dropped and the
    harness's default filter suffix (",none") is removed from metric names."""
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
    res = evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                    task_manager=manager, apply_chat_template=apply_chat_template,
                                    log_samples=False, bootstrap_iters=0)
    out = {}
    for task, metrics in res["results"].items():
        clean = {}
        for key, value in metrics.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if "_stderr" in key or key == "sample_len" or not numeric:
                continue
            clean[key.removesuffix(",none")] = float(value)
        n = res.get("n-samples", {}).get(task, {}).get("effective", 0)
        out[task] = (clean, int(n))
    return out


def main() -> None:
    """The harness CLI with `lfm2_train` registered (the stock `lm_eval` command cannot import it)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
