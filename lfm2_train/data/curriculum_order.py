"""Curriculum orders: easy -> hard permutations of a dataset's documents, as pure functions of the scores and a seed.

The offline job `data_pipelines.curriculum` saves one per score file; the SFT stage orders its examples with the
same functions. Both import them from here, below the stages and the jobs, so neither imports the other.

Methods:
- `sort`: global stable sort by score; equal scores are ordered by a seeded permutation (not by index,
  which would smuggle the tokenization order — often the source order — into the curriculum).
- `buckets`: the same ranking cut into `n_buckets` equal-count quantile buckets, easy -> hard, with a
  seeded shuffle inside each bucket: a coarse curriculum that keeps local diversity.
- `shuffle`: a seeded random permutation — the no-curriculum baseline (scores optional).
"""

from __future__ import annotations

import numpy as np

from .format import Manifest

METHODS = ("sort", "buckets", "shuffle")


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
