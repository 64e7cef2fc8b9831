"""The bundled corpus (``lfm2_train/assets/corpus/``) and the default mixture the data jobs use.

The corpus is small (about 2 MB) and ships with the package so that tokenizer training, tokenization and
end-to-end smoke runs need no download; ``lfm2_train/assets/make_corpus.py`` regenerates it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lfm2_train

from .sources import SourceConfig

BUNDLED_SOURCES = ("arithmetic", "structured", "code", "prose")

# Token share of each bundled source in the default mixture. Arithmetic has the largest weight, so with no
# `total_tokens` it is the source read exactly once; the others get weight / 0.3 times its token count
# (code and prose are then used about once too, structured a little less than once).
DEFAULT_WEIGHTS = {"arithmetic": 0.3, "structured": 0.2, "code": 0.25, "prose": 0.25}


def bundled_corpus_dir() -> Path:
    """Directory of the bundled jsonl files (inside the installed package)."""
    return Path(lfm2_train.__file__).resolve().parent / "assets" / "corpus"


def bundled_corpus_files() -> dict[str, Path]:
    """Source name -> jsonl file of the bundled corpus."""
    return {name: bundled_corpus_dir() / f"{name}.jsonl" for name in BUNDLED_SOURCES}


def bundled_corpus_index() -> dict[str, Any]:
    """``corpus.json``: per-file document counts, sizes, sha256, seed and the Python version of the prose."""
    return json.loads((bundled_corpus_dir() / "corpus.json").read_text())


def default_mixture() -> list[SourceConfig]:
    """The bundled corpus as tokenize-job sources: weighted by :data:`DEFAULT_WEIGHTS`, FIM on ``code``."""
    return [SourceConfig(name=name, path=str(path), weight=DEFAULT_WEIGHTS[name], code=name == "code")
            for name, path in bundled_corpus_files().items()]
