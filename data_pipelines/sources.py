"""Text sources for the data jobs: one config per source, loaded with `datasets`, checked before any work.

A source is a local file, a glob, or a directory of json / jsonl / parquet / plain-text files (format from
the extension unless `format` says otherwise), or a Hugging Face hub dataset written `hub:<repo id>`
(explicit, so that a typo in a local path never turns into a network request). Everything that can be
wrong with a source — no file, unreadable or corrupt file, no rows, a missing or non-text field, no
non-empty text — is raised here as a :class:`SourceError` that names the source, so that a job fails
before it writes its first shard.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from lfm2_train.data.jsonl_check import jsonl_problem

log = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
FORMATS = ("json", "parquet", "text")
EXTENSIONS = {".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
              ".txt": "text", ".text": "text", ".md": "text"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")  # datasets decompresses these on the fly
SAMPLE_BY = ("line", "paragraph", "document")


class SourceError(ValueError):
    """A source cannot be used; the message starts with the source's name."""


@dataclass
class SourceConfig:
    """One input of a data job (one entry of `sources:` in the Hydra config)."""

    name: str = MISSING  # unique; seeds per-document randomness (FIM), so renaming a source changes the data
    path: str = MISSING  # file, glob, directory, or "hub:<repo id>"
    text_field: str = "text"
    format: str | None = None  # json | parquet | text; default: from the file extension
    weight: float | None = None  # sampling weight relative to the other weighted sources
    token_budget: int | None = None  # or: exactly this many tokens (the last document may overshoot)
    code: bool = False  # fill-in-the-middle applies to this source
    sample_by: str = "document"  # plain-text files: one document per line | paragraph | file
    split: str = "train"  # hub datasets only
    subset: str | None = None  # hub datasets only (the "config name")


@dataclass
class LoadedSource:
    """A source whose files were found, read and checked; `dataset` holds only the text column."""

    config: SourceConfig
    format: str
    files: list[Path]
    dataset: Any  # datasets.Dataset
    file_info: list[dict[str, Any]] = field(default_factory=list)  # path, bytes, mtime_ns (hub: empty)

    @property
    def num_rows(self) -> int:
        return len(self.dataset)

    def texts(self, start: int, stop: int) -> list[str | None]:
        """Rows [start, stop) of the text column, straight from the memory-mapped Arrow table."""
        return self.dataset.data.column(self.config.text_field).slice(start, stop - start).to_pylist()


def _format_of(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in COMPRESSION:
        suffixes.pop()
    return EXTENSIONS.get(suffixes[-1]) if suffixes else None


def resolve_files(source: SourceConfig) -> list[Path]:
    """Files of a local source, sorted (the order is part of the data): a file, a glob or a directory.

    0-byte files are left out (with a warning); a source whose files are all empty is an error.
    """
    path = Path(source.path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _format_of(p) is not None)
        what = f"directory {path} holds no json/jsonl/parquet/text files"
    elif glob.has_magic(source.path):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        what = f"no file matches {source.path!r}"
    else:
        files = [path] if path.is_file() else []
        what = f"{path} does not exist" + (" (a hub dataset is written hub:<repo id>)" if "/" in source.path
                                             and not path.parent.exists() else "")
    if not files:
        raise SourceError(f"source {source.name!r}: {what}")
    nonempty = [f for f in files if f.stat().st_size > 0]
    if not nonempty:
        raise SourceError(f"source {source.name!r}: empty source (every file is 0 bytes: {files[0]}"
                          f"{' …' if len(files) > 1 else ''})")
    if len(nonempty) < len(files):  # `datasets` fails on a 0-byte json file with a bare StopIteration
        log.warning("source %s: skipping %d empty file(s)", source.name, len(files) - len(nonempty))
    return nonempty


def source_format(source: SourceConfig, files: list[Path]) -> str:
    """The `datasets` builder for the files: the explicit `format`, else the one extension they share."""
    if source.format is not None:
        if source.format not in FORMATS:
            raise SourceError(f"source {source.name!r}: format {source.format!r} is not one of {FORMATS}")
        return source.format
    found = {_format_of(f) for f in files}
    if None in found:
        odd = next(f for f in files if _format_of(f) is None)
        raise SourceError(f"source {source.name!r}: cannot tell the format of {odd} from its extension; "
                          f"set format: json | parquet | text")
    if len(found) > 1:
        raise SourceError(f"source {source.name!r}: files mix formats {sorted(found)}; use one source per format")
    return found.pop()


def _read_error(source: SourceConfig, where: str, err: Exception) -> SourceError:
    cause = err.__cause__ or err  # datasets wraps parse errors in several exception types; all mean "unreadable"
    problem = jsonl_problem(where) if where.endswith(".jsonl") and Path(where).is_file() else None
    if problem is not None:  # say which line, not datasets' "row 1" of an internal block
        return SourceError(f"source {source.name!r}: cannot read {where}, {problem}")
    return SourceError(f"source {source.name!r}: cannot read {where}: {type(cause).__name__}: {cause}")


def _load_files(source: SourceConfig, fmt: str, files: list[Path], cache_dir: str | None) -> Any:
    """All files in one `load_dataset`; if that fails, file by file (text column only) and concatenated.

    The fallback covers jsonl/parquet shards whose *other* columns differ (datasets refuses to unify them)
    and, when a file really is broken, names that file.
    """
    import datasets

    kwargs: dict[str, Any] = {}
    for f in files:  # invalid UTF-8 would otherwise surface as a bare UnicodeDecodeError mid-job
        problem = jsonl_problem(f, parse=False) if fmt in ("json", "text") else None
        if problem is not None:
            raise SourceError(f"source {source.name!r}: cannot read {f}, {problem}")
    if fmt == "text":  # a line is a document without its newline; paragraphs/files keep theirs
        kwargs = {"sample_by": source.sample_by, "keep_linebreaks": source.sample_by != "line"}
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir,
                                   **kwargs)
        return check_text_field(source, ds, source.path)
    except SourceError:
        if len(files) == 1:
            raise
    except Exception as err:
        if len(files) == 1:
            raise _read_error(source, str(files[0]), err) from err
    parts = []
    for f in files:
        try:
            part = datasets.load_dataset(fmt, data_files=[str(f)], split="train", cache_dir=cache_dir, **kwargs)
        except Exception as err:
            raise _read_error(source, str(f), err) from err
        if len(part):
            parts.append(check_text_field(source, part, str(f)).cast_column(source.text_field,
                                                                            datasets.Value("string")))
    return datasets.concatenate_datasets(parts) if parts else part


def load_source(source: SourceConfig, cache_dir: str | None = None) -> LoadedSource:
    """Find, read and check one source (see the module docstring for what is checked)."""
    import datasets

    if not source.name:
        raise SourceError(f"a source with path {source.path!r} has no name")
    if source.sample_by not in SAMPLE_BY:
        raise SourceError(f"source {source.name!r}: sample_by {source.sample_by!r} is not one of {SAMPLE_BY}")
    files: list[Path] = []
    if source.path.startswith(HUB_PREFIX):
        fmt = "hub"
        try:
            ds = datasets.load_dataset(source.path[len(HUB_PREFIX):], source.subset, split=source.split,
                                       cache_dir=cache_dir)
        except Exception as err:
            raise _read_error(source, source.path, err) from err
        ds = check_text_field(source, ds, source.path)
    else:
        files = resolve_files(source)
        fmt = source_format(source, files)
        ds = _load_files(source, fmt, files, cache_dir)
    check_has_text(source, ds)
    info = [{"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]
    log.info("source %s: %d rows from %d file(s) (%s)", source.name, len(ds), len(files), fmt)
    return LoadedSource(config=source, format=fmt, files=files, dataset=ds, file_info=info)


def check_text_field(source: SourceConfig, ds: Any, where: str) -> Any:
    """Refuse a dataset without the text field or with a non-string one; keep only that column."""
    name, key = source.name, source.text_field
    if len(ds) == 0 and not ds.column_names:
        return ds
    if key not in ds.column_names:
        raise SourceError(f"source {name!r}: text field {key!r} not found in {where}; columns are {ds.column_names}")
    ds = ds.select_columns([key])
    dtype = getattr(ds.features[key], "dtype", None)
    if dtype not in ("string", "large_string", "null"):
        raise SourceError(f"source {name!r}: text field {key!r} in {where} holds {ds.features[key]}, not strings")
    return ds


def check_has_text(source: SourceConfig, ds: Any) -> None:
    """Refuse a source without rows or whose texts are all empty or null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(ds) == 0:
        raise SourceError(f"source {source.name!r}: empty source (0 rows in {source.path})")
    column = ds.data.column(source.text_field)
    longest = None if pa.types.is_null(column.type) else pc.max(pc.utf8_length(column)).as_py()
    if not longest:
        raise SourceError(f"source {source.name!r}: every {source.text_field!r} value is empty or null")
