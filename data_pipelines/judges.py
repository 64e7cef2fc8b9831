"""Judges for semi-online preference pairs: score each (prompt, response) so the best and worst can be paired.

Three kinds, one interface — `score(prompts, responses, rows) -> list[float | None]` (None = no score,
the response leaves the pool):
- `verifier`: a Python function `module:function(response, row[answer_key]) -> float`, by default the
  bundled arithmetic task's `lfm2_train.tasks.arithmetic:verify` (1.0 correct / 0.0 wrong);
- `reward_model`: a `transformers` `AutoModelForSequenceClassification` directory with one output
  (a scalar reward head); the text is the prompt plus the response rendered with the reward model's
  own chat template (plain "role: content" lines when it has none); the score is that logit;
- `llm`: an LLM-as-judge. A prompt template is filled with the question, the response and the reference
  answer, run greedily on a local causal LM as a user turn, and the score is parsed from its output with
  a regular expression (first capture group). Unparseable outputs give None.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Messages = list[dict[str, Any]]

DEFAULT_LLM_TEMPLATE = (
    "Rate the answer to the question from 0 (wrong or unhelpful) to 10 (correct and helpful).\n"
    "Question: {question}\nReference answer: {answer}\nAnswer to rate: {response}\n"
    "Reply with 'Score: <number>'."
)
DEFAULT_SCORE_PATTERN = r"Score:\s*(-?\d+(?:\.\d+)?)"


@dataclass
class JudgeConfig:
    kind: str = "verifier"  # verifier | reward_model | llm
    verifier: str = "lfm2_train.tasks.arithmetic:verify"  # verifier: module:function(response, answer) -> float
    answer_key: str = "answer"  # the prompt row's column passed to the verifier / the {answer} field
    path: str | None = None  # reward_model / llm: checkpoint directory
    template: str = DEFAULT_LLM_TEMPLATE  # llm: fields {question}, {response}, {answer}
    score_pattern: str = DEFAULT_SCORE_PATTERN  # llm: regex whose first group is the score
    max_new_tokens: int = 16  # llm
    batch_size: int = 16  # reward_model / llm forward batch
    max_length: int = 1024  # reward_model: tokens per (prompt + response), truncated from the left


class Judge(Protocol):
    def score(self, prompts: Sequence[Messages], responses: Sequence[str], rows: Sequence[Mapping[str, Any]]
              ) -> list[float | None]: ...

    def describe(self) -> dict[str, Any]: ...


def _last_user(messages: Messages) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def resolve_function(spec: str) -> Callable[..., Any]:
    """'package.module:function' -> the function (clear errors for a bad spec)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge.verifier={spec!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"judge.verifier={spec!r} cannot be imported: {err}") from err
    if not callable(fn):
        raise ValueError(f"judge.verifier={spec!r} is not callable")
    return fn


class VerifierJudge:
    def __init__(self, spec: str, answer_key: str = "answer") -> None:
        self.spec = spec
        self.fn = resolve_function(spec)
        self.answer_key = answer_key

    def score(self, prompts: Sequence[Messages], responses: Sequence[str], rows: Sequence[Mapping[str, Any]]
              ) -> list[float | None]:
        out = []
        for response, row in zip(responses, rows):
            if self.answer_key not in row or row[self.answer_key] is None:
                raise KeyError(f"verifier judge: the prompt row has no {self.answer_key!r} value "
                               f"(columns: {sorted(row)}); set judge.answer_key")
            out.append(float(self.fn(response, row[self.answer_key])))
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "verifier", "verifier": self.spec, "answer_key": self.answer_key}


class RewardModelJudge:
    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device: str = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"reward model {path} has num_labels={self.model.config.num_labels}; a reward model "
                             "needs one scalar output")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.truncation_side = "left"
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    def text(self, prompt: Messages, response: str) -> str:
        conversation = [*prompt, {"role": "assistant", "content": response}]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(conversation, tokenize=False)
        return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in conversation)

    @torch.no_grad()
    def score(self, prompts: Sequence[Messages], responses: Sequence[str], rows: Sequence[Mapping[str, Any]]
              ) -> list[float | None]:
        texts = [self.text(p, r) for p, r in zip(prompts, responses)]
        out: list[float | None] = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[s:s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, add_special_tokens=False).to(self.device)
            out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "reward_model", "path": self.path}


def parse_score(text: str, pattern: str = DEFAULT_SCORE_PATTERN) -> float | None:
    """The first capture group of `pattern` in `text` as a float, or None when absent / not a number."""
    m = re.search(pattern, text)
    if not m:
        return None
    try:
        return float(m.group(1))
    except (IndexError, ValueError):
        return None


class _Fields(dict):
    def __missing__(self, key: str) -> str:
        raise KeyError(f"judge.template uses {{{key}}}; available fields: question, response, answer")


class LLMJudge:
    """`generate(prompt_texts) -> output_texts` runs the judge model; tests pass a fake one."""

    def __init__(self, generate: Callable[[list[str]], list[str]], template: str = DEFAULT_LLM_TEMPLATE,
                 pattern: str = DEFAULT_SCORE_PATTERN, answer_key: str = "answer", name: str = "callable") -> None:
        self.generate, self.template, self.pattern = generate, template, pattern
        self.answer_key, self.name = answer_key, name
        self.unparsed = 0

    def prompt(self, prompt: Messages, response: str, row: Mapping[str, Any]) -> str:
        answer = row.get(self.answer_key)
        return self.template.format_map(_Fields(question=_last_user(prompt), response=response,
                                                answer="" if answer is None else answer))

    def score(self, prompts: Sequence[Messages], responses: Sequence[str], rows: Sequence[Mapping[str, Any]]
              ) -> list[float | None]:
        outputs = self.generate([self.prompt(p, r, row) for p, r, row in zip(prompts, responses, rows)])
        scores = [parse_score(o, self.pattern) for o in outputs]
        self.unparsed += sum(s is None for s in scores)
        return scores

    def describe(self) -> dict[str, Any]:
        return {"kind": "llm", "model": self.name, "template": self.template, "score_pattern": self.pattern,
                "unparsed": self.unparsed}

    @classmethod
    def from_checkpoint(cls, path: str, cfg: JudgeConfig, device: str = "cpu") -> LLMJudge:
        """A local LFM2 checkpoint (with its tokenizer) as the judge, greedy, each prompt as a user turn."""
        from lfm2_train.evaluation.arithmetic import stop_ids
        from lfm2_train.inference import generate
        from lfm2_train.inference.sampling import SamplingConfig
        from lfm2_train.model import LFM2ForCausalLM
        from lfm2_train.tokenizer import LFM2Tokenizer

        model = LFM2ForCausalLM.from_pretrained(path, device=device).eval()
        tok = LFM2Tokenizer.from_pretrained(path)
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, stop_token_ids=stop_ids(tok, model))

        def run(texts: list[str]) -> list[str]:
            out = []
            for s in range(0, len(texts), cfg.batch_size):
                ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
                       for t in texts[s:s + cfg.batch_size]]
                gen = generate(model, ids, sampling)
                out += [tok.decode(t, skip_special_tokens=True) for t in gen.tokens]
            return out

        return cls(run, cfg.template, cfg.score_pattern, cfg.answer_key, name=str(path))


def build_judge(cfg: JudgeConfig | Any, device: str = "cpu") -> Judge:
    if cfg.kind == "verifier":
        return VerifierJudge(cfg.verifier, cfg.answer_key)
    if cfg.kind in ("reward_model", "llm"):
        if not cfg.path:
            raise ValueError(f"judge.kind={cfg.kind} needs judge.path=<checkpoint directory>")
        if cfg.kind == "reward_model":
            return RewardModelJudge(cfg.path, cfg.batch_size, cfg.max_length, device)
        return LLMJudge.from_checkpoint(cfg.path, cfg, device)
    raise ValueError(f"judge.kind={cfg.kind!r}; choose verifier, reward_model or llm")
