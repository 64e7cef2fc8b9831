"""Evaluation examples from a local file: jsonl / json, or anything `datasets` reads (parquet, csv, a
`save_to_disk` directory). Nothing is fetched from a hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DATASETS_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def load_records(path: str | Path, split: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of `path` as dicts, in file order, at most `limit` of them."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"evaluation data {p} does not exist")
    if p.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split is None:
                split = "test" if "test" in ds else next(iter(ds))
            if split not in ds:
                raise KeyError(f"{p} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        rows = [dict(r) for r in ds]
    elif p.suffix == ".jsonl":
        rows = []
        with open(p) as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{lineno} is not valid JSON: {e}") from e
    elif p.suffix == ".json":
        data = json.loads(p.read_text())
        rows = data if isinstance(data, list) else data.get(split or "test")
        if not isinstance(rows, list):
            raise ValueError(f"{p} holds neither a list of rows nor a {split or 'test'!r} list")
    elif p.suffix in _DATASETS_FORMATS:
        import datasets

        ds = datasets.load_dataset(_DATASETS_FORMATS[p.suffix], data_files=str(p), split="train")
        rows = [dict(r) for r in ds]
    else:
        raise ValueError(f"{p}: unsupported evaluation data format (use .jsonl, .json, .parquet, .csv or a "
                         "datasets directory)")
    if not rows:
        raise ValueError(f"{p} holds no examples")
    return rows[:limit] if limit else rows


def field(row: dict[str, Any], name: str, source: str, index: int) -> Any:
    """`row[name]`, or an error naming the file, the row and the fields it does have."""
    if name not in row:
        raise KeyError(f"{source} row {index} has no field {name!r} (fields: {sorted(row)})")
    return row[name]
