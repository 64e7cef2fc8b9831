"""The bundled corpus as a ready dataset: what `data.path=null` (the quick start) trains on.

Tokenized once with the bundled tiny tokenizer into `~/.cache/lfm2_train/bundled-<key>/` (override with
LFM2_TRAIN_CACHE). The key hashes the corpus index and the job settings, so a changed corpus or setting
makes a new directory instead of reusing a stale one; rerunning on a finished directory only verifies it.

The library reaches it as the data job `bundled` (`lfm2_train.jobs.run_job("bundled", ...)`), never by import.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lfm2_train.artifacts import cache_root, sha256_json

from .corpus import bundled_corpus_dir, bundled_corpus_index

SHARD_TOKENS = 262_144  # several shards even for the small corpus, so shard-level code paths are exercised


def bundled_dataset_dir(tokenizer_fingerprint: str | None = None) -> Path:
    """The cache directory; `tokenizer_fingerprint` (of a tokenizer other than the bundled one) gets its own."""
    # The tokenize job identifies its sources by path, so the installed location is part of the key: a second
    # checkout (or a moved one) gets its own directory instead of a "made with a different config" refusal.
    settings = {"corpus": bundled_corpus_index(), "shard_tokens": SHARD_TOKENS,
                "tokenizer": tokenizer_fingerprint or "bundled-tiny", "location": str(bundled_corpus_dir()),
                "version": 1}
    key = sha256_json(settings)[:12]
    return cache_root() / f"bundled-{key}"


def prepare_bundled_dataset(runtime: Any = None, tokenizer: Path | None = None) -> tuple[Path, Path]:
    """(dataset dir, tokenizer dir); rank 0 tokenizes, the other ranks wait for it. With `tokenizer` (a
    model's own, e.g. the chain's export) the corpus is tokenized with it, once, into its own directory."""
    from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

    from .tokenize import run

    fingerprint = None
    if tokenizer is not None:
        fingerprint = LFM2Tokenizer.from_pretrained(tokenizer).fingerprint()
        if fingerprint == LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).fingerprint():
            fingerprint, tokenizer = None, None
    out = bundled_dataset_dir(fingerprint)
    job: dict[str, Any] = {"output_dir": str(out), "shard_tokens": SHARD_TOKENS, "progress": False}
    if tokenizer is not None:
        job["tokenizer"] = str(tokenizer)
    if runtime is None or runtime.is_main:
        run(job)
    if runtime is not None:
        runtime.barrier()
    return out, out / "tokenizer"


def run(cfg: Mapping[str, Any] | None = None, runtime: Any = None) -> dict[str, str]:
    """The job: `{"tokenizer": a model's tokenizer directory or None}` -> `{"dataset": dir, "tokenizer": dir}`.
    `runtime` (a training runtime, not config) makes rank 0 tokenize while the other ranks wait."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - {"tokenizer"})
    if unknown:
        raise ValueError(f"the bundled job takes only `tokenizer`; unknown keys: {unknown}")
    tokenizer = cfg.get("tokenizer")
    dataset, tokenizer_dir = prepare_bundled_dataset(runtime, Path(tokenizer) if tokenizer is not None else None)
    return {"dataset": str(dataset), "tokenizer": str(tokenizer_dir)}
