"""Curriculum order: turn a score file into an easy -> hard permutation of the dataset's documents.

    python -m data_pipelines.curriculum dataset=/data/pretrain scores=model_loss method=buckets n_buckets=20 \
        pacing.kind=root pacing.start_fraction=0.2 pacing.full_at=0.8

Writes `order/<name>.npy` (int64 global document indices, easiest first) and `order/<name>.json` through
`lfm2_train.data.format.save_order`, so the order is tied to the manifest hash like the scores it came
from. The meta holds what the trainer needs to reproduce the stream: the score file (name, scorer,
sha256), method, n_buckets, seed, the pacing config (`lfm2_train.data.pacing.PacingConfig`), and a
shard-level order for readers that stream whole shards.

The ordering methods (`sort`, `buckets`, `shuffle`) are `lfm2_train.data.curriculum_order`'s.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import MISSING, DictConfig

from lfm2_train.data.curriculum_order import METHODS, bucket_bounds, build_order, shard_order
from lfm2_train.data.format import load_manifest, load_scores, save_order
from lfm2_train.data.pacing import PacingConfig

from ._job import DataJob
from .scoring import as_config


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
