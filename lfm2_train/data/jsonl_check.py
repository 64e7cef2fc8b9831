"""Name the file and line of a broken JSONL row before any library parses it.

`datasets` reports a malformed JSONL line as "An error occurred while generating the dataset" or
"JSON parse error: Invalid value. in row 1" (a row of its own blocks, not of the file), and invalid UTF-8 as a
bare `UnicodeDecodeError`; none says which file and line. Scanning first costs one sequential read and
turns those into one sentence a person can act on.
"""

from __future__ import annotations

import json
from pathlib import Path


class DataFileError(ValueError):
    """A data file that cannot be read; the message names the file and the line."""


def jsonl_problem(path: str | Path, *, parse: bool = True) -> str | None:
    """None if every non-empty line is UTF-8 (and, with `parse`, a JSON object), else 'line N: why'."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = raw[err.start:err.start + 4]
                return f"line {number}: invalid UTF-8 at byte {err.start} of the line ({bad!r})"
            if not parse or not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: not valid JSON ({err.msg} at column {err.colno})"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}, expected an object with named fields"
    return None


def check_jsonl(path: str | Path, *, parse: bool = True, what: str = "data file") -> None:
    """Raise `DataFileError` naming `path` and the first bad line."""
    problem = jsonl_problem(path, parse=parse)
    if problem is not None:
        raise DataFileError(f"{what} {path}, {problem}; fix or remove that line")


def jsonl_files(path: Path) -> list[Path]:
    """The JSONL files `path` stands for (itself, or those inside a directory, hidden ones excluded)."""
    if path.is_file():
        return [path] if path.suffix.lower() == ".jsonl" else []
    return sorted(p for p in path.rglob("*.jsonl")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
