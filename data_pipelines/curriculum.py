"""Curriculum order: turn a score file into an easy -> hard permutation of the dataset's documents.

    python -m data_pipelines.curriculum dataset=/data/pretrain scores=model_loss method=buckets n_buckets=20 \
        pacing.kind=root pacing.start_fraction=0.2 pacing.full_at=0.8

Writes `order/<name>.npy` (int64 global document indices, easiest first) and `order/<name>.json` through
`lfm2_train.data.format.save_order`, so the order is tied to the manifest hash like the scores it came
from. The meta holds what the trainer needs to reproduce the stream: the score file (name, scorer,
sha256), method, n_buckets, seed, the pacing config (`lfm2_train.data.pacing.PacingConfig`), and a
shard-level order for readers that stream whole shards.

Methods:
- `sort`: global stable sort by score; equal scores are ordered by a seeded permutation (not by index,
  which would smuggle the tokenization order — often the source order — into the curriculum).
- `buckets`: the same ranking cut into `n_buckets` equal-count quantile buckets, easy -> hard, with a
  seeded shuffle inside each bucket: a coarse curriculum that keeps local diversity.
- `shuffle`: a seeded random permutation — the no-curriculum baseline (scores optional).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING, DictConfig

from lfm2_train.data.format import Manifest, load_manifest, load_scores, save_order
from lfm2_train.data.pacing import PacingConfig

from ._job import DataJob
from .scoring import as_config

METHODS = ("sort", "buckets", "shuffle")


@dataclass
class CurriculumConfig:
    """`python -m data_pipelines.curriculum`: build and save an order from a score file."""

    dataset: str = MISSING  # dataset directory (manifest.json + shards + scores/)
    scores: str | None = None  # score file name under scores/ (required unless method=shuffle)
    method: str = "sort"  # sort | buckets | shuffle
    n_buckets: int = 10  # buckets only
    seed: int = 0  # tie-breaking (sort), in-bucket shuffle (buckets), permutation (shuffle)
    name: str | None = None  # order file name under order/; default "<scores>-<method>" / "shuffle"
    overwrite: bool = False  # replace an existing order of the same name
    pacing: PacingConfig = field(default_factory=PacingConfig)  # stored for the trainer, not applied here


def _ranked(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Documents by ascending score; ties in seeded random order (stable sort of a seeded permutation)."""
    perm = rng.permutation(len(scores))
    return perm[np.argsort(scores[perm], kind="stable")]


def sort_order(scores: np.ndarray, seed: int) -> np.ndarray:
    """Easy -> hard: a global stable sort by score, ties broken by a seeded permutation."""
    return _ranked(np.asarray(scores), np.random.default_rng(seed))


def bucket_bounds(n_docs: int, n_buckets: int) -> np.ndarray:
    """Positions in the order where each bucket starts (n_buckets + 1 values, equal counts +- 1)."""
    return np.linspace(0, n_docs, n_buckets + 1).round().astype(np.int64)


def bucket_order(scores: np.ndarray, n_buckets: int, seed: int) -> np.ndarray:
    """Equal-count quantile buckets easy -> hard, each shuffled with the seed.

    Buckets are cut by rank, not by value, so heavy ties cannot produce one giant bucket; every score in
    bucket b is <= every score in bucket b + 1 (a tie may straddle a boundary).
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets={n_buckets} must be >= 1")
    rng = np.random.default_rng(seed)
    ranked = _ranked(np.asarray(scores), rng)
    bounds = bucket_bounds(len(ranked), n_buckets)
    return np.concatenate([rng.permutation(ranked[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)])


def shuffle_order(n_docs: int, seed: int) -> np.ndarray:
    """The no-curriculum baseline: a seeded uniform permutation."""
    return np.random.default_rng(seed).permutation(n_docs)


def shard_order(manifest: Manifest, scores: np.ndarray | None, seed: int) -> tuple[list[int], list[float] | None]:
    """Shards ranked easy -> hard by mean document score (ties by a seeded permutation); without scores
    (the shuffle baseline) a seeded permutation of the shards. Returns (shard indices, means in shard order).
    """
    counts = np.array([s.documents for s in manifest.shards], dtype=np.int64)
    if scores is None:
        return np.random.default_rng([seed, 1]).permutation(len(counts)).tolist(), None
    shard_of_doc = np.repeat(np.arange(len(counts)), counts)
    sums = np.bincount(shard_of_doc, weights=scores.astype(np.float64), minlength=len(counts))
    means = np.where(counts > 0, sums / np.maximum(counts, 1), -np.inf)  # an empty shard costs nothing: first
    ranked = _ranked(means, np.random.default_rng([seed, 1])).tolist()
    return ranked, [float(m) if np.isfinite(m) else None for m in means]


def build_order(method: str, scores: np.ndarray | None, n_docs: int, *, n_buckets: int = 10,
                seed: int = 0) -> np.ndarray:
    """The permutation for `method`; pure function of its arguments (same seed, same order)."""
    if method not in METHODS:
        raise ValueError(f"curriculum method {method!r} is unknown; choose one of {list(METHODS)}")
    if method == "shuffle":
        return shuffle_order(n_docs, seed)
    if scores is None:
        raise ValueError(f"method={method} needs scores=<score file name>")
    if method == "sort":
        return sort_order(scores, seed)
    return bucket_order(scores, n_buckets, seed)


def run(cfg: CurriculumConfig | DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Build the order named by `cfg` from its score file and save it; returns a summary dict."""
    cfg = as_config(cfg, CurriculumConfig)
    pacing = PacingConfig.from_dict(cfg.pacing)  # validates before any work
    if cfg.method not in METHODS:
        raise ValueError(f"curriculum method {cfg.method!r} is unknown; choose one of {list(METHODS)}")
    directory = Path(cfg.dataset)
    manifest = load_manifest(directory)
    scores: np.ndarray | None = None
    score_meta: dict[str, Any] = {}
    if cfg.scores:
        scores, score_meta = load_scores(directory, cfg.scores, manifest)  # refuses stale scores
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise ValueError(f"scores {cfg.scores!r}: {len(bad)} non-finite values (first: document {bad[0]})")
    elif cfg.method != "shuffle":
        raise ValueError(f"method={cfg.method} needs scores=<score file name under {directory / 'scores'}>")
    name = cfg.name or (f"{cfg.scores}-{cfg.method}" if cfg.method != "shuffle" else "shuffle")
    target = directory / "order" / f"{name}.npy"
    if target.exists() and not cfg.overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=true to replace it or name=<other> to keep both")

    n_docs = manifest.num_documents
    order = build_order(cfg.method, scores, n_docs, n_buckets=cfg.n_buckets, seed=cfg.seed)
    shards, shard_means = shard_order(manifest, scores if cfg.method != "shuffle" else None, cfg.seed)
    meta: dict[str, Any] = {
        "scores": cfg.scores,
        "scorer": score_meta.get("scorer"),
        "scores_sha256": score_meta.get("sha256"),
        "method": cfg.method,
        "n_buckets": cfg.n_buckets if cfg.method == "buckets" else None,
        "seed": cfg.seed,
        "pacing": pacing.to_dict(),
        "shard_order": shards,
        "shard_order_names": [manifest.shards[i].name for i in shards],
        "shard_mean_scores": shard_means,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cfg.method == "buckets":
        bounds = bucket_bounds(n_docs, cfg.n_buckets)
        meta["bucket_bounds"] = bounds.tolist()  # order[bounds[b]:bounds[b+1]] is bucket b
        if scores is not None:
            meta["bucket_max_scores"] = [float(scores[order[lo:hi]].max()) if hi > lo else None
                                         for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    path = save_order(directory, name, order, meta, manifest)
    return {"name": name, "path": str(path), "method": cfg.method, "num_documents": n_docs,
            "shard_order": shards}


JOB = DataJob("curriculum", CurriculumConfig, run)
register_configs, main = JOB.register_configs, JOB.main

if __name__ == "__main__":
    main()
