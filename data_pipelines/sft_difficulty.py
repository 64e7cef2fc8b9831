"""Difficulty of SFT conversations, for the easy -> hard curriculum of `stage=sft`.

    # measured: a model's success rate over n samples per item, judged by a verifier (difficulty = 1 - s)
    python -m data_pipelines.sft_difficulty dataset=chat.jsonl output=difficulty.json method=success_rate \
        success_rate.checkpoint=outputs/pretrain/final success_rate.n_samples=5
    # measured on a seeded subset only, then predicted for every row by a small classifier
    python -m data_pipelines.sft_difficulty ... method=success_rate success_rate.max_items=2000 output=measured.json
    python -m data_pipelines.sft_difficulty ... method=classifier classifier.scores=measured.json output=difficulty.json

The output (`lfm2_train.data.chat_dataset.save_difficulty`) holds one value per dataset row (null where
unscored) and the dataset's fingerprint, so `stage=sft stage.curriculum.source=file` refuses a file made
for other data. The item of a row is its prompt: every message before the last assistant turn; the
reference answer for the verifier is the row's `answer_field`.

The classifier is logistic regression on hashed n-grams of the prompt (digits mapped to `0`, so "47" and
"93" share the feature "00": length of numbers is what makes arithmetic hard), trained with soft targets
on the measured success rates; it reports the Spearman correlation with held-out measured rows.
"""

from __future__ import annotations

import importlib
import re
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lfm2_train.data.chat import ChatFormatError, normalize_messages
from lfm2_train.data.chat_dataset import ChatRows, load_chat_rows, load_difficulty, save_difficulty

from ._job import DataJob
from .scoring import as_config

METHODS = ("success_rate", "classifier")

# (prompts as message lists, their tool lists or None, n) -> n sampled response texts per prompt
SampleFn = Callable[[list[list[dict[str, Any]]], list[Any], int], list[list[str]]]


@dataclass
class SuccessRateConfig:
    """`method=success_rate`: sample n responses per prompt from a checkpoint and judge them."""

    checkpoint: str | None = None  # HF LFM2 directory with its tokenizer
    n_samples: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 32  # prompts per generate call (each repeated n_samples times)
    verifier: str = "lfm2_train.tasks:verify"  # module:function (response text, answer) -> score in [0, 1]
    answer_field: str = "answer"
    max_items: int | None = None  # score a seeded random subset; the rest stay null (predict them: classifier)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...


@dataclass
class ClassifierConfig:
    """`method=classifier`: predict 1 - success from the prompt text, trained on a measured file."""

    scores: str | None = None  # difficulty file of this dataset with (some) measured values
    n_features: int = 1 << 16  # hashing buckets
    ngrams: list[int] = field(default_factory=lambda: [1, 2, 3])  # word n-gram orders
    digit_shape: bool = True  # map every digit to 0 before hashing
    l2: float = 1e-4
    steps: int = 300  # full-batch Adam steps
    lr: float = 0.1
    val_fraction: float = 0.2  # measured rows held out to report the correlation


@dataclass
class SFTDifficultyConfig:
    """`python -m data_pipelines.sft_difficulty`: write one difficulty per row of a chat dataset."""

    output: str | None = None  # difficulty file (.json) to write; None = <output_dir>/difficulty.json
    output_dir: str | None = None  # used when `output` is not set (how the chain runner places job outputs)
    method: str = "success_rate"  # success_rate | classifier
    # the data, exactly as stage=sft loads it (the fingerprint must match)
    dataset: str | None = None  # None = the bundled chat arithmetic (bundled_rows / bundled_seed / bundled_levels)
    split: str = "train"
    messages_field: str = "messages"
    tools_field: str = "tools"
    bundled_rows: int = 2000
    bundled_seed: int = 0
    bundled_levels: list[int] | None = None
    cache_dir: str | None = None
    seed: int = 0
    overwrite: bool = False
    success_rate: SuccessRateConfig = field(default_factory=SuccessRateConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


# ============================================================================================== items


def prompt_messages(messages: Any) -> list[dict[str, Any]]:
    """Everything before the last assistant turn: what the model is asked. ChatFormatError if there is none."""
    msgs = normalize_messages(messages)
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise ChatFormatError("no_assistant_turn", "the conversation has no assistant turn")
    if last == 0:
        raise ChatFormatError("bad_format", "the assistant speaks first: there is no prompt")
    return msgs[:last]


def prompt_text(prompt: Sequence[Mapping[str, Any]]) -> str:
    """A prompt's text for features: the contents of its turns."""
    return "\n".join(str(m.get("content") or "") for m in prompt)


def resolve_verifier(spec: str) -> Callable[[str, Any], float]:
    """`module:function` -> the function."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"success_rate.verifier={spec!r} must be 'module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"success_rate.verifier={spec!r}: {module} has no function {name!r}")
    return fn


# ============================================================================================== success rate


def success_rates(prompts: Sequence[list[dict[str, Any]]], answers: Sequence[Any], sample: SampleFn,
                  verifier: Callable[[str, Any], float], n_samples: int, batch_size: int = 32,
                  tools: Sequence[Any] | None = None) -> np.ndarray:
    """Mean verifier score over `n_samples` responses per prompt -> (len(prompts),) float64 in [0, 1]."""
    tools = list(tools) if tools is not None else [None] * len(prompts)
    if n_samples < 1:
        raise ValueError(f"success_rate.n_samples={n_samples} must be >= 1")
    out = np.zeros(len(prompts), dtype=np.float64)
    for lo in range(0, len(prompts), batch_size):
        batch = list(prompts[lo:lo + batch_size])
        responses = sample(batch, tools[lo:lo + batch_size], n_samples)
        if len(responses) != len(batch) or any(len(r) != n_samples for r in responses):
            raise ValueError(f"the sampler returned {[len(r) for r in responses]} responses for {len(batch)} "
                             f"prompts x {n_samples}")
        for j, texts in enumerate(responses):
            scores = [float(verifier(t, answers[lo + j])) for t in texts]
            if any(not 0.0 <= s <= 1.0 for s in scores):
                raise ValueError(f"the verifier returned {scores}; scores must be in [0, 1]")
            out[lo + j] = float(np.mean(scores))
    return out


def model_sampler(model: Any, tokenizer: Any, cfg: SuccessRateConfig | DictConfig, seed: int) -> SampleFn:
    """A `SampleFn` that samples from an `LFM2ForCausalLM` with its chat template; stops at `<|im_end|>`."""
    from lfm2_train.inference import SamplingConfig, generate

    calls = {"n": 0}
    stops = sorted({tokenizer.eos_token_id, *([tokenizer.eod_token_id] if tokenizer.eod_token_id is not None else [])})

    def sample(prompts: list[list[dict[str, Any]]], tools: list[Any], n: int) -> list[list[str]]:
        ids = [tokenizer.apply_chat_template(p, tools=t or None, add_generation_prompt=True)
               for p, t in zip(prompts, tools)]
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  stop_token_ids=stops, seed=seed + calls["n"])
        calls["n"] += 1
        out = generate(model, [p for p in ids for _ in range(n)], sampling).tokens
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in out]
        return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]

    return sample


# ============================================================================================== classifier


_WORD_RE = re.compile(r"\w+|[^\w\s]")


def hashed_features(text: str, n_features: int, ngrams: Sequence[int] = (1, 2, 3),
                    digit_shape: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(bucket ids, weights): hashed word n-grams, each row L2-normalised (so long prompts do not dominate)."""
    if digit_shape:
        text = re.sub(r"\d", "0", text)
    words = _WORD_RE.findall(text.lower())
    counts: dict[int, float] = {}
    for n in ngrams:
        for i in range(len(words) - n + 1):
            key = zlib.crc32((f"{n}\x1f" + "\x1f".join(words[i:i + n])).encode("utf-8")) % n_features
            counts[key] = counts.get(key, 0.0) + 1.0
    if not counts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    ids = np.fromiter(counts.keys(), dtype=np.int64)
    w = np.fromiter(counts.values(), dtype=np.float32)
    return ids, w / np.linalg.norm(w)


class DifficultyClassifier:
    """Logistic regression over hashed n-grams: predicts a success rate; difficulty = 1 - prediction."""

    def __init__(self, n_features: int = 1 << 16, ngrams: Sequence[int] = (1, 2, 3), digit_shape: bool = True,
                 l2: float = 1e-4, steps: int = 300, lr: float = 0.1, seed: int = 0) -> None:
        import torch

        self.n_features, self.ngrams, self.digit_shape = n_features, tuple(ngrams), digit_shape
        self.l2, self.steps, self.lr, self.seed = l2, steps, lr, seed
        self.bag = torch.nn.EmbeddingBag(n_features, 1, mode="sum")
        torch.nn.init.zeros_(self.bag.weight)
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def _inputs(self, texts: Sequence[str]) -> tuple[Any, Any, Any]:
        import torch

        feats = [hashed_features(t, self.n_features, self.ngrams, self.digit_shape) for t in texts]
        offsets = torch.tensor(np.cumsum([0] + [len(f[0]) for f in feats[:-1]]), dtype=torch.long)
        ids = torch.from_numpy(np.concatenate([f[0] for f in feats]) if feats else np.zeros(0, np.int64))
        w = torch.from_numpy(np.concatenate([f[1] for f in feats]) if feats else np.zeros(0, np.float32))
        return ids, offsets, w

    def _logits(self, inputs: tuple[Any, Any, Any]) -> Any:
        ids, offsets, w = inputs
        return self.bag(ids, offsets, per_sample_weights=w)[:, 0] + self.bias  # (N,)

    def fit(self, texts: Sequence[str], success: Sequence[float]) -> DifficultyClassifier:
        import torch
        import torch.nn.functional as F

        if len(texts) == 0:
            raise ValueError("the classifier needs at least one measured row to train on")
        torch.manual_seed(self.seed)
        inputs = self._inputs(texts)
        target = torch.tensor(np.asarray(success, dtype=np.float32))
        opt = torch.optim.Adam([self.bag.weight, self.bias], lr=self.lr)
        # A model this small is per-op latency bound: extra intra-op threads only add wake-ups, which cost
        # 40x on a busy machine (measured: 27 s vs 0.7 s for 100 steps on 400 prompts).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(self.steps):
                opt.zero_grad()
                loss = F.binary_cross_entropy_with_logits(self._logits(inputs), target)
                loss = loss + self.l2 * self.bag.weight.pow(2).sum()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(threads)
        return self

    def predict_success(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if len(texts) == 0:
            return np.zeros(0)
        with torch.no_grad():
            return torch.sigmoid(self._logits(self._inputs(texts))).double().numpy()

    def predict_difficulty(self, texts: Sequence[str]) -> np.ndarray:
        return 1.0 - self.predict_success(texts)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # average ties
            m = x == v
            r[m] = r[m].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# ============================================================================================== job


def _rows(cfg: DictConfig) -> ChatRows:
    return load_chat_rows(cfg.dataset, split=cfg.split, bundled_n=cfg.bundled_rows, bundled_seed=cfg.bundled_seed,
                          bundled_levels=cfg.bundled_levels, cache_dir=cfg.cache_dir)


def _prompts(data: ChatRows, field_name: str) -> tuple[list[list[dict[str, Any]] | None], dict[str, int]]:
    out: list[list[dict[str, Any]] | None] = []
    skipped: dict[str, int] = {}
    for msgs in data.column(field_name):
        try:
            out.append(prompt_messages(msgs))
        except ChatFormatError as err:
            out.append(None)
            skipped[err.reason] = skipped.get(err.reason, 0) + 1
    return out, skipped


def measure(cfg: DictConfig, data: ChatRows, sample: SampleFn | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """method=success_rate -> (difficulty per row, NaN where unscored; meta)."""
    c = cfg.success_rate
    prompts, skipped = _prompts(data, cfg.messages_field)
    answers = data.column(c.answer_field)
    usable = [i for i, (p, a) in enumerate(zip(prompts, answers)) if p is not None and a is not None]
    skipped["no_answer"] = sum(1 for p, a in zip(prompts, answers) if p is not None and a is None)
    if not usable:
        raise ValueError(f"{data.source}: no row has both a prompt and a {c.answer_field!r} value to verify")
    if c.max_items is not None and c.max_items < len(usable):
        pick = np.random.default_rng(cfg.seed).choice(len(usable), size=c.max_items, replace=False)
        usable = [usable[i] for i in np.sort(pick)]
    if sample is None:
        sample = _checkpoint_sampler(cfg)
    has_tools = bool(data.rows) and cfg.tools_field in data.rows[0]
    tools = data.column(cfg.tools_field) if has_tools else [None] * len(data)
    rates = success_rates([prompts[i] for i in usable], [answers[i] for i in usable], sample,
                          resolve_verifier(c.verifier), c.n_samples, c.batch_size, [tools[i] for i in usable])
    difficulty = np.full(len(data), np.nan)
    difficulty[usable] = 1.0 - rates
    meta = {"checkpoint": c.checkpoint, "n_samples": c.n_samples, "temperature": c.temperature,
            "verifier": c.verifier, "scored": len(usable), "skipped": {k: v for k, v in skipped.items() if v},
            "mean_success": float(rates.mean())}
    return difficulty, meta


def _checkpoint_sampler(cfg: DictConfig) -> SampleFn:
    import torch

    from lfm2_train.model import LFM2ForCausalLM
    from lfm2_train.tokenizer import LFM2Tokenizer

    c = cfg.success_rate
    if not c.checkpoint:
        raise ValueError("method=success_rate needs success_rate.checkpoint=<HF LFM2 directory>")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
    model = LFM2ForCausalLM.from_pretrained(c.checkpoint, device=device).eval()
    return model_sampler(model, LFM2Tokenizer.from_pretrained(c.checkpoint), c, cfg.seed)


def predict(cfg: DictConfig, data: ChatRows) -> tuple[np.ndarray, dict[str, Any]]:
    """method=classifier -> (difficulty per row: measured where known, predicted elsewhere; meta)."""
    c = cfg.classifier
    if not c.scores:
        raise ValueError("method=classifier needs classifier.scores=<difficulty file with measured values>")
    measured, header = load_difficulty(c.scores, dataset_fingerprint=data.fingerprint, n_rows=len(data),
                                       require_complete=False)
    prompts, skipped = _prompts(data, cfg.messages_field)
    texts = ["" if p is None else prompt_text(p) for p in prompts]
    known = np.flatnonzero(~np.isnan(measured) & np.array([p is not None for p in prompts]))
    if len(known) < 2:
        raise ValueError(f"{c.scores} holds {len(known)} measured rows; the classifier needs at least 2")
    perm = np.random.default_rng(cfg.seed).permutation(known)
    n_val = int(round(len(known) * c.val_fraction)) if len(known) >= 10 else 0
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    def make() -> DifficultyClassifier:
        return DifficultyClassifier(c.n_features, list(c.ngrams), c.digit_shape, c.l2, c.steps, c.lr, cfg.seed)

    meta: dict[str, Any] = {"scores": str(c.scores), "measured_method": header["method"], "measured": len(known),
                            "n_features": c.n_features, "ngrams": list(c.ngrams), "digit_shape": c.digit_shape}
    if len(val):
        held = make().fit([texts[i] for i in train], 1.0 - measured[train])
        meta["val_rows"] = int(len(val))
        meta["val_spearman"] = spearman(held.predict_difficulty([texts[i] for i in val]), measured[val])
    model = make().fit([texts[i] for i in known], 1.0 - measured[known])
    difficulty = np.full(len(data), np.nan)
    todo = np.array([i for i, p in enumerate(prompts) if p is not None], dtype=np.int64)
    difficulty[todo] = model.predict_difficulty([texts[i] for i in todo])
    difficulty[known] = measured[known]  # measured values win over predictions
    meta["skipped"] = skipped
    return difficulty, meta


def run(cfg: SFTDifficultyConfig | DictConfig | Mapping[str, Any], sample: SampleFn | None = None) -> dict[str, Any]:
    """Score the dataset with `cfg.method` and write `cfg.output`; `sample` replaces the checkpoint sampler."""
    cfg = as_config(cfg, SFTDifficultyConfig)
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r}; choose one of {list(METHODS)}")
    if cfg.output is None and cfg.output_dir is None:
        raise ValueError("set output=<file.json> (or output_dir=<dir> to write <dir>/difficulty.json)")
    out = Path(cfg.output) if cfg.output is not None else Path(cfg.output_dir) / "difficulty.json"
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=true to replace it")
    data = _rows(cfg)
    start = time.perf_counter()
    difficulty, meta = measure(cfg, data, sample) if cfg.method == "success_rate" else predict(cfg, data)
    meta.update({"source": data.source, "seconds": round(time.perf_counter() - start, 3),
                 "config": OmegaConf.to_container(cfg, resolve=True)})
    save_difficulty(out, difficulty, dataset_fingerprint=data.fingerprint, method=cfg.method, meta=meta)
    scored = difficulty[~np.isnan(difficulty)]
    return {"output": str(out), "method": cfg.method, "rows": len(data), "scored": int(len(scored)),
            "mean_difficulty": float(scored.mean()) if len(scored) else None,
            **{k: meta[k] for k in ("val_spearman", "mean_success") if k in meta}}


JOB = DataJob("sft_difficulty", SFTDifficultyConfig, run)
main = JOB.main

if __name__ == "__main__":
    main()
