"""Small JSON manifests: read and written atomically, compared with the settings of the run at hand.

A manifest records what an artifact was made from (input hashes, settings, a format tag). A later run
builds the same record from its own inputs and asks `describe_differences`; when they disagree the user
sees one `key: cached X, now Y` entry per differing setting, nested keys dotted, hashes shortened.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic

_ABSENT = object()
_HEX = re.compile(r"[0-9a-f]{32,}")  # a digest: shown by its first 12 characters


class DataFormatError(ValueError):
    """An artifact on disk is incomplete, modified, or made for other inputs (tokenizer, model, data)."""


def read_manifest(path: str | Path, *, format: str | None = None) -> dict[str, Any] | None:
    """The JSON object at `path`; None when there is no file. With `format`, its `format` field must match."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path} holds a JSON {type(data).__name__}, not an object")
    if format is not None and data.get("format") != format:
        raise DataFormatError(f"{path}: format {data.get('format')!r} is not {format!r}")
    return data


def write_manifest(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON through a temporary file: never half a manifest."""
    write_json_atomic(path, dict(data))


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, str):
        digest = _HEX.match(value)
        return f"{value[:12]}…{value[digest.end():]}" if digest else repr(value)
    return repr(value)


def differences(cached: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """`key: cached X, now Y` for every (dotted, nested) key whose value differs, in key order."""
    a, b = _flatten(cached), _flatten(now)
    return [f"{key}: cached {_show(a.get(key, _ABSENT))}, now {_show(b.get(key, _ABSENT))}"
            for key in sorted(set(a) | set(b)) if a.get(key, _ABSENT) != b.get(key, _ABSENT)]


def describe_differences(cached: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """`differences` on one line ("; "-separated); empty when the two agree."""
    return "; ".join(differences(cached, now))
