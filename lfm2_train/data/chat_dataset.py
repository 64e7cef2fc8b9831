"""Chat datasets for SFT: load rows, fingerprint them, encode them with skip counts, and read/write the
per-row difficulty file that orders them easy -> hard.

Rows come from any file `datasets` loads (jsonl / json / parquet / csv, a directory of them, or a
`save_to_disk` directory) with a `messages` column and an optional `tools` column, or — with no path —
from the bundled chat arithmetic task generated from a seed. The fingerprint ties a difficulty file to
the exact rows it scored: a stale file is refused instead of ordering the wrong conversations.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import LFM2Tokenizer
from .chat import ChatFormatError, EncodedChat, encode_conversation
from .jsonl_check import check_jsonl, jsonl_files

DIFFICULTY_FORMAT = "lfm2_train.sft_difficulty/1"
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class ChatRows:
    """Rows as plain Python objects plus the fingerprint of where they came from."""

    rows: list[dict[str, Any]]
    fingerprint: str  # sha256 of the source files' bytes (or of the generated rows)
    source: str  # path, or "bundled:arithmetic(n=..., seed=...)"

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        if self.rows and name not in self.rows[0]:
            raise KeyError(f"{self.source} has no column {name!r}; columns: {sorted(self.rows[0])}")
        return [r.get(name) for r in self.rows]


def _sha256_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def rows_fingerprint(rows: Sequence[dict[str, Any]]) -> str:
    """sha256 of the canonical JSON of in-memory rows (for generated data)."""
    blob = json.dumps(list(rows), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def bundled_rows(n: int, seed: int, levels: Sequence[int] | None = None) -> ChatRows:
    """The bundled chat arithmetic task: `messages`, `answer`, `difficulty` columns (`levels`: a subset of
    `tasks.arithmetic.LEVELS`, None = all)."""
    from ..tasks import make_problems, sft_conversations

    if n < 1:
        raise ValueError(f"bundled chat data needs n >= 1 rows, got {n}")
    if levels is None:
        rows = sft_conversations(n, seed)
    else:
        rows = [{"messages": p.messages(), "answer": p.answer, "difficulty": p.difficulty}
                for p in make_problems(n, seed, tuple(int(x) for x in levels))]
    what = f"n={n}, seed={seed}" + (f", levels={list(levels)}" if levels is not None else "")
    return ChatRows(rows, rows_fingerprint(rows), f"bundled:arithmetic({what})")


def load_chat_rows(path: str | Path | None, *, split: str = "train", bundled_n: int = 2000, bundled_seed: int = 0,
                   bundled_levels: Sequence[int] | None = None, cache_dir: str | None = None) -> ChatRows:
    """Rows of a `datasets`-loadable file or directory; `path=None` = the bundled arithmetic task."""
    if path is None:
        return bundled_rows(bundled_n, bundled_seed, bundled_levels)
    import datasets

    p = Path(path)
    files = dataset_files(p)
    for f in jsonl_files(p):  # name the file and line of a broken row (datasets' own errors name neither)
        check_jsonl(f, what="chat dataset")
    if _is_saved_dataset(p):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"{p} has no split {split!r}; splits: {sorted(ds)}")
            ds = ds[split]
    elif p.is_dir():
        ds = datasets.load_dataset(str(p), split=split, cache_dir=cache_dir)
    else:
        ds = datasets.load_dataset(_BUILDERS[p.suffix.lower()], data_files=str(p), split="train", cache_dir=cache_dir)
    return ChatRows(ds.to_list(), _sha256_files(files), str(p))


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and (p / "dataset_info.json").is_file() and (p / "state.json").is_file()


def dataset_files(path: str | Path) -> list[Path]:
    """The files `load_chat_rows` reads from `path`, whose bytes are the dataset's fingerprint; raises for a
    missing path or an unknown file type (before anything is read)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"chat dataset {p} does not exist")
    if _is_saved_dataset(p):
        return [f for f in p.rglob("*") if f.is_file()]
    if p.is_dir():  # hidden files inside the dataset are not data; a hidden directory above it is fine
        return [f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    if p.suffix.lower() not in _BUILDERS:
        raise ValueError(f"chat dataset {p}: unknown file type {p.suffix!r}; use one of {sorted(_BUILDERS)}")
    return [p]


def dataset_fingerprint(path: str | Path) -> str:
    """`ChatRows.fingerprint` of the file or directory at `path`, from its bytes alone (no parsing), so a
    content-keyed cache can be found without loading the rows."""
    return _sha256_files(dataset_files(path))


@dataclass
class EncodedRows:
    """The usable conversations, which dataset row each came from, and why the others were skipped."""

    examples: list[EncodedChat]
    row_index: np.ndarray  # (n_usable,) int64: dataset row of each example
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    n_rows: int = 0

    def describe(self) -> str:
        why = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.n_rows} rows, {len(self.examples)} usable; skipped: {why}"


def iter_encoded(tokenizer: LFM2Tokenizer, data: ChatRows, *, max_length: int, messages_field: str = "messages",
                 tools_field: str | None = "tools", start: int = 0) -> Iterator[tuple[int, EncodedChat | str]]:
    """(row, its encoding or its skip reason) for every row from `start` on, in order: the one encoding loop
    behind `encode_rows` and the chat-shard writer (which resumes mid-dataset)."""
    messages = data.column(messages_field)
    has_tools = tools_field is not None and bool(data.rows) and tools_field in data.rows[0]
    tools = data.column(tools_field) if has_tools else [None] * len(data)
    for i in range(start, len(data)):
        try:
            yield i, encode_conversation(tokenizer, messages[i], tools[i], max_length=max_length)
        except ChatFormatError as err:
            yield i, err.reason


def encode_rows(tokenizer: LFM2Tokenizer, data: ChatRows, *, max_length: int, messages_field: str = "messages",
                tools_field: str | None = "tools") -> EncodedRows:
    """Encode every row; unusable rows are counted by reason (see `chat.SKIP_REASONS`), never silently lost.

    Raises ValueError when no row is usable, naming the source and the reasons.
    """
    examples, index, skipped = [], [], Counter()
    for i, encoded in iter_encoded(tokenizer, data, max_length=max_length, messages_field=messages_field,
                                   tools_field=tools_field):
        if isinstance(encoded, str):
            skipped[encoded] += 1
        else:
            examples.append(encoded)
            index.append(i)
    out = EncodedRows(examples, np.asarray(index, dtype=np.int64), skipped, len(data))
    if not examples:
        raise ValueError(f"{data.source}: no usable conversation ({out.describe()})")
    return out


# ---------------------------------------------------------------------------------------- difficulty files
def save_difficulty(path: str | Path, difficulty: Sequence[float | None] | np.ndarray, *, dataset_fingerprint: str,
                    method: str, meta: dict[str, Any] | None = None) -> Path:
    """One difficulty per dataset row (higher = harder; None/NaN = not scored), written atomically."""
    values = [None if v is None or not np.isfinite(v) else float(v) for v in np.asarray(difficulty, dtype=object)]
    payload = {"format": DIFFICULTY_FORMAT, "dataset_fingerprint": dataset_fingerprint, "method": method,
               "n_rows": len(values), "n_scored": sum(v is not None for v in values), "meta": meta or {},
               "difficulty": values}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_difficulty(path: str | Path, *, dataset_fingerprint: str | None = None, n_rows: int | None = None,
                    require_complete: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """-> (float64 array, NaN where unscored; the file's header). Checks the fingerprint and row count."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"difficulty file {path} does not exist")
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("format") != DIFFICULTY_FORMAT:
        raise ValueError(f"{path} is not a difficulty file (format {payload.get('format')!r}, "
                         f"expected {DIFFICULTY_FORMAT!r})")
    if dataset_fingerprint is not None and payload["dataset_fingerprint"] != dataset_fingerprint:
        raise ValueError(f"{path} scored other data (fingerprint {payload['dataset_fingerprint'][:12]}..., "
                         f"this dataset {dataset_fingerprint[:12]}...): re-run data_pipelines.sft_difficulty")
    values = np.array([np.nan if v is None else v for v in payload["difficulty"]], dtype=np.float64)
    if n_rows is not None and len(values) != n_rows:
        raise ValueError(f"{path} has {len(values)} rows, the dataset {n_rows}")
    if require_complete and np.isnan(values).any():
        raise ValueError(f"{path}: {int(np.isnan(values).sum())} rows have no difficulty (method="
                         f"{payload['method']}); predict the rest with method=classifier")
    header = {k: v for k, v in payload.items() if k != "difficulty"}
    return values, header
