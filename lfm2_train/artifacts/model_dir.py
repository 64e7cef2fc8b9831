"""Model directories that other steps consume: written whole or not at all, and checked before they are used.

A model directory is produced in a temporary sibling and renamed into place (`atomic.replace_dir`), so a kill
during an export leaves either the previous complete directory or none — never one with only a
`config.json`. Its manifest (`lfm2_train_manifest.json`) lists every file with its size, and a consumer asks
`model_dir_problem` before it trusts a directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_MANIFEST = "lfm2_train_manifest.json"
_WEIGHTS = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"


def write_model_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """The manifest, with the name and size of every file beside it (cheap to check, unlike hashes)."""
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MODEL_MANIFEST}
    payload = {**manifest, "files": files}
    (directory / MODEL_MANIFEST).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def model_dir_problem(directory: Path) -> str | None:
    """None when `directory` is a complete model (or PEFT adapter) directory, else a one-line reason."""
    if not directory.is_dir():
        return f"{directory} does not exist"
    adapter = (directory / "adapter_config.json").is_file()  # a PEFT adapter directory (LoRA stage output)
    if not adapter and not (directory / "config.json").is_file():
        return f"{directory} has no config.json"
    manifest_path = directory / MODEL_MANIFEST
    if manifest_path.is_file():
        try:
            files = json.loads(manifest_path.read_text()).get("files")
        except json.JSONDecodeError:
            return f"{manifest_path} is not valid JSON"
        for name, size in (files or {}).items():
            path = directory / name
            if not path.is_file():
                return f"{directory}: {name} listed in {MODEL_MANIFEST} is missing"
            if path.stat().st_size != size:
                return f"{directory}: {name} has {path.stat().st_size} bytes, {MODEL_MANIFEST} says {size}"
    if adapter:
        found = any((directory / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin"))
        return None if found else f"{directory} has no adapter_model.safetensors"
    if (directory / _WEIGHTS_INDEX).is_file():
        try:
            shards = set(json.loads((directory / _WEIGHTS_INDEX).read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError):
            return f"{directory / _WEIGHTS_INDEX} is not a valid safetensors index"
        missing = sorted(s for s in shards if not (directory / s).is_file())
        return f"{directory}: weight shard(s) {missing} missing" if missing else None
    if not any((directory / name).is_file() for name in (_WEIGHTS, "pytorch_model.bin")):
        return f"{directory} has no {_WEIGHTS}"
    return None
