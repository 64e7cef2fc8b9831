"""Difficulty scoring: one float32 score per document (higher = harder), saved next to the shards.

    python -m data_pipelines.scoring dataset=/data/pretrain scorer=compression
    python -m data_pipelines.scoring dataset=/data/pretrain scorer=model_loss model_loss.checkpoint=/ckpt/ref

The result is `scores/<name>.npy` + `.json` in the dataset directory, written with
`lfm2_train.data.format.save_scores`, so it is tied to the manifest hash: if the shards change, every
reader (`load_scores`, the curriculum job, the trainer) refuses the stale scores instead of silently
ordering the wrong documents.

Scorers are pluggable. A scorer is any object with `score(reader, doc_indices) -> np.ndarray` (one value
per requested global document index); a factory that builds it from the job config is registered by name
with `register_scorer`. Third-party scorers live in their own module, listed in `plugins=[my.module]` so
it is imported (and registers itself) before the scorer is looked up; their settings go in `options`.

Built in: `model_loss` (a reference model's mean token cross-entropy), `compression` (zlib ratio of the
token bytes), `length` (token count), `external` (a file of per-item scores, e.g. the ensemble success
rate of the LFM2 report mapped to 1 - s), and `combo` (a weighted sum of normalized components).
"""

from __future__ import annotations

import csv
import importlib
import json
import math
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from omegaconf import MISSING, DictConfig, OmegaConf

from lfm2_train.data.format import (
    DataFormatError,
    Manifest,
    ShardReader,
    load_manifest,
    load_scores,
    save_scores,
    verify_shards,
)
from lfm2_train.data.packing import batch_rows, longest_with_shortest

from ._job import DataJob

# ============================================================================================== config


@dataclass
class ModelLossConfig:
    """`scorer=model_loss`: mean next-token cross-entropy of a reference model on each document."""

    checkpoint: str | None = None  # Hugging Face LFM2 directory (ours, transformers' or the Hub's)
    max_length: int = 4096  # documents longer than this are truncated to their first max_length tokens
    max_tokens_per_batch: int = 32768  # rows x padded row length per forward; must be >= max_length
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:1 ...
    dtype: str = "float32"  # float32 | bfloat16
    attn_implementation: str | None = None  # None = the checkpoint's own
    head_chunk_tokens: int = 4096  # tokens per LM-head call: bounds the logits to chunk x vocab floats


@dataclass
class CompressionConfig:
    """`scorer=compression`: raw-deflate size / byte size of the document's token ids."""

    level: int = 9  # zlib level 0..9
    workers: int = 1  # threads (zlib releases the GIL); level 9 deflates roughly 10-20 MB/s per core


@dataclass
class ExternalConfig:
    """`scorer=external`: per-item values from a file, keyed by global document index or by a document id."""

    path: str | None = None  # .jsonl | .csv | .npy
    format: str | None = None  # jsonl | csv | npy; None = from the suffix of `path`
    key_field: str = "index"  # field holding the key (jsonl / csv)
    value_field: str = "score"  # field holding the value (jsonl / csv)
    ids_path: str | None = None  # None: keys are global document indices; else the document id of every
    # document in global order (.txt one per line | .jsonl with `ids_field` | .npy), and keys are ids
    ids_field: str | None = None  # field of the .jsonl ids file; default key_field
    higher_is_easier: bool = False  # e.g. a success rate s: difficulty = 1 - s
    fill_missing: float | None = None  # difficulty given to documents without a value; None = error


@dataclass
class ComboConfig:
    """`scorer=combo`: sum of weight x normalized component score."""

    components: dict[str, float] = field(default_factory=dict)  # scorer name -> weight (computed now)
    saved: dict[str, float] = field(default_factory=dict)  # existing score file name -> weight (reused)
    normalize: str = "rank"  # rank (to [0, 1], robust to scale) | zscore | minmax | none


@dataclass
class ScoringConfig:
    """`python -m data_pipelines.scoring`: score every document of `dataset` with `scorer`."""

    dataset: str = MISSING  # dataset directory (manifest.json + shards)
    scorer: str = "compression"  # model_loss | compression | length | external | combo | a plugin's name
    name: str | None = None  # score file name under scores/; default = scorer
    overwrite: bool = False  # replace an existing score file of the same name
    verify: bool = True  # re-hash the shards against the manifest first
    progress: bool = True  # tqdm progress bar
    threads: int | None = None  # torch intra-op threads; None = torch's default
    plugins: list[str] = field(default_factory=list)  # modules imported first (they register scorers)
    options: dict[str, Any] = field(default_factory=dict)  # free-form settings for plugin scorers
    model_loss: ModelLossConfig = field(default_factory=ModelLossConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    external: ExternalConfig = field(default_factory=ExternalConfig)
    combo: ComboConfig = field(default_factory=ComboConfig)


# ============================================================================================== registry


@runtime_checkable
class Scorer(Protocol):
    """Anything that gives one difficulty value (higher = harder) per requested global document index.

    `doc_indices` is an int64 array; the result has the same length and order. Scorers see a subset so
    that a caller may split a dataset across jobs; `run` passes all documents. An optional
    `describe() -> dict` is stored in the score file's metadata.
    """

    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray: ...


ScorerFactory = Callable[[DictConfig], Scorer]
_SCORERS: dict[str, ScorerFactory] = {}


def register_scorer(name: str, factory: ScorerFactory | None = None, *, overwrite: bool = False) -> Any:
    """Register `factory(job_cfg) -> Scorer` under `name`; usable as `@register_scorer("mine")`.

    Re-registering a name is an error unless `overwrite=True`, so two plugins cannot silently shadow each
    other (or a built-in).
    """

    def add(f: ScorerFactory) -> ScorerFactory:
        if name in _SCORERS and not overwrite and _SCORERS[name] is not f:
            raise ValueError(f"scorer {name!r} is already registered; pass overwrite=True to replace it")
        _SCORERS[name] = f
        return f

    return add(factory) if factory is not None else add


def available_scorers() -> list[str]:
    return sorted(_SCORERS)


def build_scorer(name: str, cfg: DictConfig) -> Scorer:
    if name not in _SCORERS:
        raise ValueError(f"unknown scorer {name!r}; available: {available_scorers()} "
                         "(a plugin module must be listed in `plugins` to register its scorer)")
    scorer = _SCORERS[name](cfg)
    if not isinstance(scorer, Scorer):
        raise TypeError(f"scorer factory {name!r} returned {type(scorer).__name__}, which has no score() method")
    return scorer


# ============================================================================================== model_loss


def _batches(lengths: np.ndarray, capacity: int, max_tokens: int) -> Iterator[list[list[int]]]:
    """Rows of document positions (`longest_with_shortest` into `capacity` tokens), grouped into batches of
    consecutive rows whose padded size (rows x longest row) stays within `max_tokens`."""
    rows = longest_with_shortest(lengths, capacity)
    for batch in batch_rows([int(lengths[row].sum()) for row in rows], max_tokens):
        yield [rows[r] for r in batch]


class ModelLossScorer:
    """Mean token cross-entropy of a reference model per document: what the model finds surprising is hard.

    Several documents are packed per row with `doc_ids`, so the model's attention mask and conv history
    keep them apart and the result equals scoring each document alone. The loss of a document of L tokens
    (separator included, truncated to `max_length`) is the mean over its L - 1 next-token predictions;
    predicting the separator counts, the first token has no context and is not predicted. A document with
    fewer than two tokens has no prediction and scores 0.
    """

    def __init__(self, model: Any, *, max_length: int = 4096, max_tokens_per_batch: int = 32768,
                 head_chunk_tokens: int = 4096, progress: bool = False, window: int = 1 << 16,
                 checkpoint: str | None = None) -> None:
        if max_length < 2:
            raise ValueError(f"model_loss.max_length={max_length} must be >= 2 (one prediction needs two tokens)")
        if max_tokens_per_batch < max_length:
            raise ValueError(f"model_loss.max_tokens_per_batch={max_tokens_per_batch} must be >= "
                             f"model_loss.max_length={max_length}: a truncated document must fit one batch")
        self.model = model.eval()
        self.max_length = max_length
        self.max_tokens_per_batch = max_tokens_per_batch
        self.head_chunk_tokens = max(1, head_chunk_tokens)
        self.progress = progress
        self.window = window  # documents planned at once: bounds the packing plan's memory
        self.checkpoint = checkpoint  # recorded in the score metadata only

    def describe(self) -> dict[str, Any]:
        config = getattr(self.model, "config", None)
        return {"max_length": self.max_length, "max_tokens_per_batch": self.max_tokens_per_batch,
                "vocab_size": getattr(config, "vocab_size", None),
                "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
                "checkpoint": self.checkpoint}

    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        import torch
        from tqdm import tqdm

        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        lengths = np.minimum(reader.doc_lengths()[doc_indices], self.max_length)
        out = np.zeros(len(doc_indices), dtype=np.float32)
        device = next(self.model.parameters()).device
        bar = tqdm(total=int(lengths.sum()), unit="tok", desc="model_loss", disable=not self.progress)
        with torch.inference_mode():
            for w0 in range(0, len(doc_indices), self.window):
                w_len = lengths[w0:w0 + self.window]
                for batch in _batches(w_len, self.max_length, self.max_tokens_per_batch):
                    positions = [w0 + p for row in batch for p in row]
                    losses = self._batch_loss(reader, doc_indices, lengths, batch, w0, device)
                    out[positions] = losses
                    bar.update(int(lengths[positions].sum()))
        bar.close()
        return out

    def _batch_loss(self, reader: ShardReader, doc_indices: np.ndarray, lengths: np.ndarray,
                    batch: list[list[int]], w0: int, device: Any) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        width = max(int(lengths[[w0 + p for p in row]].sum()) for row in batch)
        ids = np.zeros((len(batch), width), dtype=np.int64)
        docs = np.full((len(batch), width), -1, dtype=np.int64)  # per-row document id, -1 = padding
        owner = np.full((len(batch), width), -1, dtype=np.int64)  # position of the document in this batch
        k = 0
        for r, row in enumerate(batch):
            t = 0
            for j, p in enumerate(row):
                n = int(lengths[w0 + p])
                ids[r, t:t + n] = reader.document(int(doc_indices[w0 + p]))[:n]
                docs[r, t:t + n] = j
                owner[r, t:t + n] = k
                t += n
                k += 1
        input_ids = torch.from_numpy(ids).to(device)
        doc_ids = torch.from_numpy(docs).to(device)
        # Call the backbone and the head separately: full (B, T, vocab) logits would be GBs for a real vocab.
        h = self.model.model(input_ids, doc_ids=doc_ids)
        has_target = (doc_ids[:, :-1] == doc_ids[:, 1:]) & (doc_ids[:, :-1] >= 0)
        h = h[:, :-1][has_target]
        targets = input_ids[:, 1:][has_target]
        who = torch.from_numpy(owner).to(device)[:, :-1][has_target]
        sums = torch.zeros(k, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        for s in range(0, len(targets), self.head_chunk_tokens):
            e = s + self.head_chunk_tokens
            logits = self.model.lm_head(h[s:e]).float()
            ce = F.cross_entropy(logits, targets[s:e], reduction="none")
            sums.index_add_(0, who[s:e], ce.double())
            counts.index_add_(0, who[s:e], torch.ones_like(ce, dtype=torch.float64))
        mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
        return mean.cpu().numpy().astype(np.float32)


def _model_loss_factory(cfg: DictConfig) -> Scorer:
    import torch

    from lfm2_train.model import LFM2ForCausalLM

    c = cfg.model_loss
    if not c.checkpoint:
        raise ValueError("scorer=model_loss needs model_loss.checkpoint=<Hugging Face LFM2 directory>")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if c.dtype not in dtypes:
        raise ValueError(f"model_loss.dtype={c.dtype!r}; choose one of {sorted(dtypes)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
    model = LFM2ForCausalLM.from_pretrained(c.checkpoint, dtype=dtypes[c.dtype], device=device,
                                            attn_implementation=c.attn_implementation)
    manifest = load_manifest(cfg.dataset)
    if manifest.vocab_size > model.config.vocab_size:
        raise DataFormatError(f"{cfg.dataset} has token ids up to {manifest.vocab_size} but the reference model "
                              f"embeds only {model.config.vocab_size}")
    return ModelLossScorer(model, max_length=c.max_length, max_tokens_per_batch=c.max_tokens_per_batch,
                           head_chunk_tokens=c.head_chunk_tokens, progress=cfg.progress, checkpoint=str(c.checkpoint))


# ============================================================================================== heuristics


class CompressionScorer:
    """zlib compression ratio of a document's token ids: repetitive, formulaic text compresses well (easy).

    The bytes compressed are the document's token ids without the separator, in the dataset's own
    little-endian dtype (uint16 or uint32, as stored in the shards) — no tokenizer is needed and the
    score does not depend on how ids decode. Raw deflate (no zlib header/checksum) keeps the fixed
    overhead small; it still inflates the ratio of very short documents a little. Score =
    compressed bytes / raw bytes (about 0.1 for boilerplate, about 1 for high-entropy ids, slightly above 1
    for a short high-entropy document); an empty document scores 0.
    """

    def __init__(self, level: int = 9, workers: int = 1, chunk: int = 4096) -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"compression.level={level} must be in 0..9")
        self.level = level
        self.workers = max(1, workers)
        self.chunk = chunk  # documents per task when workers > 1

    def describe(self) -> dict[str, Any]:
        return {"level": self.level, "bytes": "token ids without the separator, little-endian shard dtype"}

    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        if self.workers == 1 or len(doc_indices) <= self.chunk:
            return self._score(reader, doc_indices)
        from concurrent.futures import ThreadPoolExecutor

        # Threads, not processes: zlib releases the GIL while deflating, and threads share the memory map
        # (no pickling, no re-reading the .idx files, no process start-up).
        parts = [doc_indices[i:i + self.chunk] for i in range(0, len(doc_indices), self.chunk)]
        with ThreadPoolExecutor(self.workers) as pool:
            return np.concatenate(list(pool.map(lambda part: self._score(reader, part), parts)))

    def _score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        out = np.zeros(len(doc_indices), dtype=np.float32)
        for j, d in enumerate(np.asarray(doc_indices, dtype=np.int64)):
            toks = reader.document(int(d))[:-1]
            raw = np.ascontiguousarray(toks.astype(toks.dtype.newbyteorder("<"), copy=False)).tobytes()
            if raw:
                z = zlib.compressobj(self.level, zlib.DEFLATED, -15)
                out[j] = (len(z.compress(raw)) + len(z.flush())) / len(raw)
        return out


class LengthScorer:
    """Token count without the separator: longer documents need longer-range skills (a weak but free signal)."""

    def describe(self) -> dict[str, Any]:
        return {"unit": "tokens without the separator"}

    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        return (reader.doc_lengths()[np.asarray(doc_indices, dtype=np.int64)] - 1).astype(np.float32)


# ============================================================================================== external


def _read_records(path: Path, fmt: str, key_field: str, value_field: str) -> list[tuple[Any, Any]]:
    """(key, value) pairs from a jsonl or csv file; a row lacking either field is an error naming the line."""
    pairs: list[tuple[Any, Any]] = []
    if fmt == "jsonl":
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if key_field not in row or value_field not in row:
                    raise ValueError(f"{path}:{line_no}: needs fields {key_field!r} and {value_field!r}, "
                                     f"has {sorted(row)}")
                pairs.append((row[key_field], row[value_field]))
    elif fmt == "csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {key_field, value_field} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: csv header {reader.fieldnames} lacks {sorted(missing)}")
            for row in reader:
                pairs.append((row[key_field], row[value_field]))
    else:
        raise ValueError(f"external.format={fmt!r}; choose jsonl, csv or npy")
    return pairs


def _as_index(key: Any) -> int | None:
    """An integer document index from a json int, an integral float or a csv digit string; else None."""
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key
    if isinstance(key, float) and key.is_integer():
        return int(key)
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return None


def _read_ids(path: Path, field_name: str) -> list[str]:
    """Document id of every document in global order: .txt (one per line), .jsonl (field) or .npy."""
    if path.suffix == ".npy":
        return [str(x) for x in np.load(path, allow_pickle=False).tolist()]
    if path.suffix == ".jsonl":
        with open(path) as f:
            return [str(json.loads(line)[field_name]) for line in f if line.strip()]
    with open(path) as f:
        return [line.rstrip("\n") for line in f]


class ExternalScorer:
    """Difficulty from a file computed elsewhere (an ensemble's success rate per item, a classifier, ...).

    Keys are global document indices, or document ids resolved through `ids_path` (the id of every
    document in global order, as the tokenization job recorded them); ids in the file that are not in
    the dataset are ignored (the file may cover a larger corpus), but an index out of range is an error
    (the file was made for another dataset). Values are difficulties, or easiness when
    `higher_is_easier` (difficulty = 1 - value, which for a success rate s is the report's 1 - s).
    A NaN value counts as missing. Missing documents raise, naming how many and the first one, unless
    `fill_missing` gives them a difficulty.
    """

    def __init__(self, path: str | Path, *, fmt: str | None = None, key_field: str = "index",
                 value_field: str = "score", ids_path: str | Path | None = None, ids_field: str | None = None,
                 higher_is_easier: bool = False, fill_missing: float | None = None) -> None:
        self.path = Path(path)
        self.fmt = fmt or self.path.suffix.lstrip(".").lower()
        self.key_field, self.value_field = key_field, value_field
        self.ids_path = Path(ids_path) if ids_path else None
        self.ids_field = ids_field or key_field
        self.higher_is_easier = higher_is_easier
        self.fill_missing = fill_missing
        self.unknown_ids = 0

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.fmt, "key_field": self.key_field,
                "value_field": self.value_field, "ids_path": str(self.ids_path) if self.ids_path else None,
                "higher_is_easier": self.higher_is_easier, "fill_missing": self.fill_missing,
                "unknown_ids_ignored": self.unknown_ids}

    def _values(self, n_docs: int) -> tuple[np.ndarray, list[str] | None]:
        """Raw values for all documents (NaN = none) and, when keyed by id, the id of each document."""
        values = np.full(n_docs, np.nan, dtype=np.float64)
        if self.fmt == "npy":
            if self.ids_path is not None:
                raise ValueError("external: a .npy file is positional (global document order); ids_path does not apply")
            arr = np.asarray(np.load(self.path, allow_pickle=False), dtype=np.float64)
            if arr.ndim != 1 or len(arr) != n_docs:
                raise ValueError(f"{self.path}: shape {arr.shape}, expected ({n_docs},) (one value per document)")
            return arr, None
        pairs = _read_records(self.path, self.fmt, self.key_field, self.value_field)
        ids = _read_ids(self.ids_path, self.ids_field) if self.ids_path is not None else None
        if ids is not None:
            if len(ids) != n_docs:
                raise ValueError(f"{self.ids_path}: {len(ids)} ids for {n_docs} documents")
            where = {doc_id: i for i, doc_id in enumerate(ids)}
            if len(where) != len(ids):
                raise ValueError(f"{self.ids_path}: document ids are not unique")
        seen: set[int] = set()
        self.unknown_ids = 0
        for key, value in pairs:
            if ids is not None:
                if str(key) not in where:
                    self.unknown_ids += 1
                    continue
                doc = where[str(key)]
            else:
                doc = _as_index(key)
                if doc is None:
                    raise ValueError(f"{self.path}: key {key!r} is not a global document index "
                                     "(set external.ids_path to key by document id)")
                if not 0 <= doc < n_docs:
                    raise ValueError(f"{self.path}: document index {doc} out of range [0, {n_docs}): "
                                     "made for another dataset?")
            if doc in seen:
                raise ValueError(f"{self.path}: document {key!r} has more than one value")
            seen.add(doc)
            try:
                values[doc] = math.nan if value is None or value == "" else float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{self.path}: value {value!r} of {key!r} is not a number") from None
        return values, ids

    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        values, ids = self._values(len(reader))
        difficulty = (1.0 - values if self.higher_is_easier else values)[doc_indices]
        missing = np.flatnonzero(np.isnan(difficulty))
        if len(missing):
            if self.fill_missing is None:
                first = int(doc_indices[missing[0]])
                key = f"id {ids[first]!r} (document {first})" if ids is not None else f"document index {first}"
                raise ValueError(f"external scores {self.path}: {len(missing)} of {len(doc_indices)} documents "
                                 f"have no value; first missing: {key}. Set external.fill_missing=<difficulty> "
                                 "to fill them")
            difficulty[missing] = self.fill_missing
        return difficulty.astype(np.float32)


def _external_factory(cfg: DictConfig) -> Scorer:
    e = cfg.external
    if not e.path:
        raise ValueError("scorer=external needs external.path=<.jsonl | .csv | .npy>")
    return ExternalScorer(e.path, fmt=e.format, key_field=e.key_field, value_field=e.value_field,
                          ids_path=e.ids_path, ids_field=e.ids_field, higher_is_easier=e.higher_is_easier,
                          fill_missing=e.fill_missing)


# ============================================================================================== combo


def normalize_scores(x: np.ndarray, how: str) -> np.ndarray:
    """Put scorers on one scale before weighting: losses (~2-8 nats) and ratios (~0-1) differ wildly."""
    x = np.asarray(x, dtype=np.float64)
    if how == "none" or len(x) == 0:
        return x
    if how == "rank":  # dense rank in [0, 1]: equal values share a rank, the scale does not matter
        uniq, inv = np.unique(x, return_inverse=True)
        return inv / max(len(uniq) - 1, 1)
    if how == "zscore":
        sd = x.std()
        return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
    if how == "minmax":
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)
    raise ValueError(f"combo.normalize={how!r}; choose rank, zscore, minmax or none")


class ComboScorer:
    """Weighted sum of normalized scores: scorers computed now (`components`) and score files (`saved`).

    Reusing a saved score file is how an expensive `model_loss` run is mixed with cheap heuristics
    without recomputing it; `load_scores` still refuses it if the shards changed since.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.components = {str(k): float(v) for k, v in cfg.combo.components.items()}
        self.saved = {str(k): float(v) for k, v in cfg.combo.saved.items()}
        self.normalize = cfg.combo.normalize
        if not self.components and not self.saved:
            raise ValueError("scorer=combo needs '+combo.components={scorer: weight}' and/or "
                             "'+combo.saved={score_file: weight}'")
        if "combo" in self.components:
            raise ValueError("combo cannot contain itself")
        normalize_scores(np.zeros(1), self.normalize)  # fail on a bad name before any work

    def describe(self) -> dict[str, Any]:
        return {"components": self.components, "saved": self.saved, "normalize": self.normalize}

    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        doc_indices = np.asarray(doc_indices, dtype=np.int64)
        total = np.zeros(len(doc_indices), dtype=np.float64)
        for name, weight in self.saved.items():
            values = load_scores(reader.directory, name, reader.manifest)[0][doc_indices]
            total += weight * normalize_scores(values, self.normalize)
        for name, weight in self.components.items():
            values = build_scorer(name, self.cfg).score(reader, doc_indices)
            total += weight * normalize_scores(values, self.normalize)
        return total.astype(np.float32)


register_scorer("model_loss", _model_loss_factory)
register_scorer("compression", lambda cfg: CompressionScorer(cfg.compression.level, cfg.compression.workers))
register_scorer("length", lambda cfg: LengthScorer())
register_scorer("external", _external_factory)
register_scorer("combo", ComboScorer)


# ============================================================================================== job


def as_config(cfg: Any, schema: type) -> DictConfig:
    """A typed DictConfig from a dataclass instance, a dict or a (Hydra) DictConfig: unknown keys raise."""
    base = OmegaConf.structured(schema)
    if isinstance(cfg, schema):
        return OmegaConf.structured(cfg)
    if isinstance(cfg, Mapping) or isinstance(cfg, DictConfig):
        return OmegaConf.merge(base, cfg)  # type: ignore[return-value]
    raise TypeError(f"expected {schema.__name__}, a dict or a DictConfig, got {type(cfg).__name__}")


def run(cfg: ScoringConfig | DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Score every document of `cfg.dataset` and write scores/<name>.npy; returns a summary dict."""
    cfg = as_config(cfg, ScoringConfig)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    for module in cfg.plugins:
        importlib.import_module(module)
    directory = Path(cfg.dataset)
    manifest: Manifest = verify_shards(directory) if cfg.verify else load_manifest(directory)
    name = cfg.name or cfg.scorer
    target = directory / "scores" / f"{name}.npy"
    if target.exists() and not cfg.overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=true to replace it or name=<other> to keep both")
    scorer = build_scorer(cfg.scorer, cfg)
    reader = ShardReader(directory, manifest)
    start = time.perf_counter()
    scores = np.asarray(scorer.score(reader, np.arange(len(reader), dtype=np.int64)), dtype=np.float32)
    elapsed = time.perf_counter() - start
    if scores.shape != (len(reader),):
        raise ValueError(f"scorer {cfg.scorer!r} returned shape {scores.shape} for {len(reader)} documents")
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(f"scorer {cfg.scorer!r} gave {len(bad)} non-finite scores (first: document {bad[0]})")
    describe = getattr(scorer, "describe", None)
    stats = {"min": float(scores.min()), "mean": float(scores.mean()), "max": float(scores.max()),
             "std": float(scores.std())} if len(scores) else {}
    meta = {
        "scorer": cfg.scorer,
        "higher_is_harder": True,
        "scorer_meta": describe() if callable(describe) else {},
        "config": OmegaConf.to_container(cfg, resolve=True),
        "stats": stats,
        "seconds": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = save_scores(directory, name, scores, meta, manifest)
    return {"name": name, "path": str(path), "scorer": cfg.scorer, "num_documents": int(len(scores)),
            "seconds": round(elapsed, 3), **stats}


JOB = DataJob("scoring", ScoringConfig, run)
register_configs, main = JOB.register_configs, JOB.main

if __name__ == "__main__":
    main()
