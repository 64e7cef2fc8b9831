"""Content hashes that identify what an artifact was made from.

Each value here is stored on disk (dataset manifests, score files, teacher and reference caches, job
states) and compared on a later run, so the byte layout of every digest is fixed: changing one makes
every existing cache look stale. Tests pin them with known inputs.

- `sha256_file`: the file's bytes, streamed (a multi-GB shard is never read into memory at once).
- `sha256_json`: settings as canonical JSON (`json.dumps(..., sort_keys=True)`), the identity of a job.
- `files_sha256`: a named list of files, one `name\\0<file sha256>\\n` line each, in path order.
- `checkpoint_sha256`: a model's identity: config.json and every weight file of a Hugging Face directory,
  by name, so moving or copying the directory keeps it.
- `adapter_sha256`: a PEFT adapter's config and weights, optionally on top of its base's checkpoint hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin")
ADAPTER_CONFIG = "adapter_config.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(data: Any) -> str:
    """Hex sha256 of `json.dumps(data, sort_keys=True)`: equal settings give equal digests in any key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def files_sha256(files: Iterable[Path], *, header: str = "") -> str:
    """Hex sha256 over `name\\0<sha256 of the file>\\n` for each file in sorted path order, after `header`.

    Only base names enter the digest, so the same files in another directory hash the same."""
    h = hashlib.sha256(header.encode())
    for file in sorted(files):
        h.update(f"{file.name}\0{sha256_file(file)}\n".encode())
    return h.hexdigest()


def checkpoint_files(directory: str | Path) -> list[Path]:
    """config.json and the weight files (safetensors, their index, .bin) of a Hugging Face directory, sorted."""
    directory = Path(directory)
    return sorted({p for pattern in ("config.json", *WEIGHT_PATTERNS) for p in directory.glob(pattern)})


def checkpoint_sha256(directory: str | Path) -> str:
    """The identity of a model checkpoint: `files_sha256` of its config.json and weight files.

    Refuses a directory with no weight files: a config alone does not identify a model."""
    files = checkpoint_files(directory)
    if not any(f.name != "config.json" for f in files):
        raise FileNotFoundError(f"model directory {directory} has no weight files (*.safetensors / *.bin)")
    return files_sha256(files)


def adapter_sha256(directory: str | Path, *, base_sha256: str | None = None) -> str:
    """The identity of a PEFT adapter: its adapter_config.json and adapter_model.* files.

    With `base_sha256` (the base checkpoint's hash) the digest names the whole model, base + adapter."""
    directory = Path(directory)
    files = [directory / ADAPTER_CONFIG, *directory.glob("adapter_model.*")]
    return files_sha256(files, header=f"base\0{base_sha256}\n" if base_sha256 is not None else "")
