"""The evaluation task kinds `stage=eval` runs, each a small spec (parsed from the stage's task list with
unknown keys refused) and a function `(spec, runner, tokenizer) -> TaskResult`.

Kinds: `perplexity` (token shards), `arithmetic` (built-in chat arithmetic), `generation` (prompt/answer
file, exact and numeric match), `multiple_choice` (log-likelihood of each choice: acc and acc_norm),
`lm_eval` (tasks run by lm-evaluation-harness through `harness.LFM2LM`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tokenizer import LFM2Tokenizer
from .arithmetic import arithmetic_accuracy, chat_prompt, stop_ids
from .perplexity import validation_loss
from .records import field as get_field
from .records import load_records
from .runner import Runner
from .scoring import exact_match, numeric_match, pick_choice


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]  # metric name -> value (accuracies in [0, 1])
    n: int  # examples (or tokens, for perplexity)
    samples: list[dict[str, Any]] = field(default_factory=list)  # per-example records (eval_samples.jsonl)
    seconds: float = 0.0


@dataclass
class PerplexitySpec:
    """Validation loss on the held-out documents of a token-shard dataset (the training split)."""

    kind: str = "perplexity"
    name: str = "val"
    path: str | None = None  # dataset dir; None = the run's `data` config (the bundled corpus by default)
    seq_len: int | None = None  # None = data.seq_len
    max_documents: int | None = None  # None = data.val_max_documents
    val_fraction: float | None = None  # None = data.val_fraction
    seed: int | None = None  # None = data.seed
    batch_size: int = 8


@dataclass
class ArithmeticSpec:
    """The bundled chat arithmetic (lfm2_train/tasks/arithmetic.py), greedy, scored with `verify`."""

    kind: str = "arithmetic"
    name: str = "arithmetic"
    n: int = 64
    seed: int = 0
    levels: list[int] | None = None
    max_new_tokens: int = 24


@dataclass
class GenerationSpec:
    """Greedy answers to the prompts of a file with `prompt` / `answer` fields."""

    kind: str = "generation"
    name: str = ""
    path: str = ""
    split: str | None = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    chat: bool = True  # wrap the prompt as a user turn (else: bos + prompt text)
    metric: str = "exact"  # the headline metric: exact | numeric (both are reported)
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)  # extra stop strings: the response is cut at the first
    limit: int | None = None


@dataclass
class MultipleChoiceSpec:
    """Each choice scored by log p(choice | prompt); acc picks the highest sum, acc_norm the highest per
    character (lm-evaluation-harness's acc_norm) or per token."""

    kind: str = "multiple_choice"
    name: str = ""
    path: str = ""
    split: str | None = None
    prompt_field: str = "prompt"
    choices_field: str = "choices"
    label_field: str = "label"  # index into choices, or the correct choice's text
    chat: bool = False  # prompt as a user turn; choices are then scored as the assistant's reply
    choice_prefix: str = " "  # put before every choice (plain prompts: the word-boundary space)
    length_norm: str = "chars"  # chars | tokens
    limit: int | None = None


@dataclass
class LmEvalSpec:
    """Tasks run by lm-evaluation-harness (the `eval` extra) on this model, e.g. local YAML tasks."""

    kind: str = "lm_eval"
    name: str = "lm_eval"
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None  # directory of task YAMLs; when set, the built-in task index is skipped
    num_fewshot: int | None = None
    limit: int | None = None
    apply_chat_template: bool = False
    max_length: int | None = None


SPECS = {s.kind: s for s in (PerplexitySpec, ArithmeticSpec, GenerationSpec, MultipleChoiceSpec, LmEvalSpec)}
AnySpec = PerplexitySpec | ArithmeticSpec | GenerationSpec | MultipleChoiceSpec | LmEvalSpec


def parse_task(raw: dict[str, Any], index: int) -> AnySpec:
    """A task dict from the config -> its spec; unknown kinds, unknown keys and missing files are named."""
    where = f"stage.tasks[{index}]"
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError(f"{where} must be a mapping with a 'kind' ({sorted(SPECS)}), got {raw!r}")
    kind = raw["kind"]
    if kind not in SPECS:
        raise ValueError(f"{where}.kind={kind!r}; choose one of {sorted(SPECS)}")
    cls = SPECS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where} ({kind}) has unknown key(s) {unknown}; known: {sorted(known)}")
    spec = cls(**raw)
    if isinstance(spec, (GenerationSpec, MultipleChoiceSpec)):
        if not spec.path:
            raise ValueError(f"{where} ({kind}) needs a 'path' to a jsonl / datasets file")
        if not Path(spec.path).exists():
            raise FileNotFoundError(f"{where}.path={spec.path} does not exist")
        spec.name = spec.name or Path(spec.path).stem
    if isinstance(spec, GenerationSpec) and spec.metric not in ("exact", "numeric"):
        raise ValueError(f"{where}.metric={spec.metric!r}; choose exact or numeric")
    if isinstance(spec, MultipleChoiceSpec) and spec.length_norm not in ("chars", "tokens"):
        raise ValueError(f"{where}.length_norm={spec.length_norm!r}; choose chars or tokens")
    if isinstance(spec, LmEvalSpec) and not spec.tasks:
        raise ValueError(f"{where} (lm_eval) needs a non-empty 'tasks' list")
    return spec


def plain_prompt(tokenizer: LFM2Tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer.encode(text)]


def run_arithmetic(spec: ArithmeticSpec, runner: Runner, tokenizer: LFM2Tokenizer) -> TaskResult:
    levels = tuple(spec.levels) if spec.levels is not None else None
    r = arithmetic_accuracy(runner.model, tokenizer, n=spec.n, seed=spec.seed, levels=levels,
                            max_new_tokens=spec.max_new_tokens, runner=runner)
    return TaskResult(spec.name, spec.kind, {"accuracy": r["accuracy"]}, r["n"])


def run_perplexity(spec: PerplexitySpec, runner: Runner, dataset_dir: str | Path, data_cfg: Any) -> TaskResult:
    r = validation_loss(runner.model, dataset_dir, seq_len=spec.seq_len or data_cfg.seq_len,
                        max_documents=spec.max_documents or data_cfg.val_max_documents,
                        batch_size=spec.batch_size, seed=data_cfg.seed if spec.seed is None else spec.seed,
                        val_fraction=data_cfg.val_fraction if spec.val_fraction is None else spec.val_fraction)
    return TaskResult(spec.name, spec.kind, {"loss": r["loss"], "ppl": r["ppl"]}, r["tokens"])


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


def run_generation(spec: GenerationSpec, runner: Runner, tokenizer: LFM2Tokenizer) -> TaskResult:
    rows = load_records(spec.path, spec.split, spec.limit)
    prompts, answers, texts = [], [], []
    for i, row in enumerate(rows):
        text = str(get_field(row, spec.prompt_field, spec.path, i))
        texts.append(text)
        answers.append(get_field(row, spec.answer_field, spec.path, i))
        prompts.append(chat_prompt(tokenizer, text) if spec.chat else plain_prompt(tokenizer, text))
    outputs = runner.generate(prompts, spec.max_new_tokens, stop_ids(tokenizer, runner.model))
    exact = numeric = 0.0
    samples = []
    for text, answer, ids in zip(texts, answers, outputs):
        response = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), list(spec.stop))
        em, nm = exact_match(response, answer), numeric_match(response, answer)
        exact, numeric = exact + em, numeric + nm
        samples.append({"prompt": text, "response": response, "answer": answer, "exact_match": em,
                        "numeric_match": nm})
    n = len(rows)
    metrics = {"exact_match": exact / n, "numeric_match": numeric / n}
    headline = "exact_match" if spec.metric == "exact" else "numeric_match"
    metrics = {headline: metrics[headline], **metrics}  # the headline metric first in tables
    return TaskResult(spec.name, spec.kind, metrics, n, samples)


def run_multiple_choice(spec: MultipleChoiceSpec, runner: Runner, tokenizer: LFM2Tokenizer) -> TaskResult:
    rows = load_records(spec.path, spec.split, spec.limit)
    requests: list[tuple[list[int], list[int]]] = []
    per_row: list[tuple[str, list[str], int]] = []
    for i, row in enumerate(rows):
        prompt = str(get_field(row, spec.prompt_field, spec.path, i))
        choices = [str(c) for c in get_field(row, spec.choices_field, spec.path, i)]
        if len(choices) < 2:
            raise ValueError(f"{spec.path} row {i}: a multiple-choice item needs at least 2 choices")
        label = get_field(row, spec.label_field, spec.path, i)
        if isinstance(label, str):  # the correct choice's text (first), else an index written as text
            if label in choices:
                label = choices.index(label)
            elif not label.strip().lstrip("-").isdigit():
                raise ValueError(f"{spec.path} row {i}: label {label!r} is not one of the choices {choices}")
        label = int(label)
        if not 0 <= label < len(choices):
            raise ValueError(f"{spec.path} row {i}: label {label} is out of range for {len(choices)} choices")
        context = chat_prompt(tokenizer, prompt) if spec.chat else plain_prompt(tokenizer, prompt)
        for c in choices:
            requests.append((context, tokenizer.encode(spec.choice_prefix + c)))
        per_row.append((prompt, choices, label))
    scores = runner.loglikelihood(requests)
    acc = acc_norm = 0
    samples, k = [], 0
    for prompt, choices, label in per_row:
        lls = [s[0] for s in scores[k:k + len(choices)]]
        if spec.length_norm == "chars":
            lengths = [len(spec.choice_prefix + c) for c in choices]
        else:
            lengths = [len(requests[k + j][1]) for j in range(len(choices))]
        k += len(choices)
        best, best_norm = pick_choice(lls, lengths)
        acc += best == label
        acc_norm += best_norm == label
        samples.append({"prompt": prompt, "choices": choices, "label": label, "logliks": lls, "pred": best,
                        "pred_norm": best_norm})
    n = len(per_row)
    return TaskResult(spec.name, spec.kind, {"acc": acc / n, "acc_norm": acc_norm / n}, n, samples)


def run_lm_eval(spec: LmEvalSpec, runner: Runner, tokenizer: LFM2Tokenizer) -> list[TaskResult]:
    from .harness import LFM2LM, evaluate_tasks

    lm = LFM2LM(model=runner.model, tokenizer=tokenizer, runner=runner, max_length=spec.max_length)
    results = evaluate_tasks(lm, spec.tasks, include_path=spec.include_path, num_fewshot=spec.num_fewshot,
                             limit=spec.limit, apply_chat_template=spec.apply_chat_template)
    return [TaskResult(f"{spec.name}/{task}", spec.kind, metrics, n) for task, (metrics, n) in results.items()]
