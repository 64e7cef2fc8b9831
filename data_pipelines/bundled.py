"""The bundled corpus as a ready dataset: what `data.path=null` (the quick start) trains on.

Tokenized once with the bundled tiny tokenizer into `~/.cache/lfm2_train/bundled-<key>/` (override with
LFM2_TRAIN_CACHE). The key hashes the corpus index and the job settings, so a changed corpus or setting
makes a new directory instead of reusing a stale one; rerunning on a finished directory only verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .corpus import bundled_corpus_dir, bundled_corpus_index

SHARD_TOKENS = 262_144  # several shards even for the small corpus, so shard-level code paths are exercised


def bundled_dataset_dir() -> Path:
    # The tokenize job identifies its sources by path, so the installed location is part of the key: a second
    # checkout (or a moved one) gets its own directory instead of a "made with a different config" refusal.
    settings = {"corpus": bundled_corpus_index(), "shard_tokens": SHARD_TOKENS, "tokenizer": "bundled-tiny",
                "location": str(bundled_corpus_dir()), "version": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("LFM2_TRAIN_CACHE", Path.home() / ".cache" / "lfm2_train"))
    return root / f"bundled-{key}"


def prepare_bundled_dataset(runtime: Any = None) -> tuple[Path, Path]:
    """(dataset dir, tokenizer dir); rank 0 tokenizes, the other ranks wait for it."""
    from .tokenize import run

    out = bundled_dataset_dir()
    if runtime is None or runtime.is_main:
        run({"output_dir": str(out), "shard_tokens": SHARD_TOKENS, "progress": False})
    if runtime is not None:
        runtime.barrier()
    return out, out / "tokenizer"
