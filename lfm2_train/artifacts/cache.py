"""Where content-addressed caches live: the bundled corpus's shards, chat shards of JSONL given to a stage,
reference log-probs. One root, so a user moves or clears them all with one setting."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LFM2_TRAIN_CACHE"


def cache_root() -> Path:
    """`$LFM2_TRAIN_CACHE`, default `~/.cache/lfm2_train`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "lfm2_train"))
