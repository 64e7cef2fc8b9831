"""Where a stage's chat data comes from: chat shards given as `data.path`, or rows tokenised once into a cache.

`open_sft` / `open_preference` are what the SFT and preference stages call. With `data.path` they check the
directory (chat shards of the stage's kind, the run's tokenizer and chat template, a `seq_len` that fits)
and read it, with `data.order` as the SFT order. Given rows (`stage.dataset`, or the bundled task) they
tokenise them once into `$LFM2_TRAIN_CACHE/chat_shards/<kind>-<key>/`, the key a hash of the rows' bytes,
the tokenizer, its chat template and the settings; every later run with the same inputs reads the shards
without tokenising or parsing anything. Rank 0 writes while the other ranks wait at the runtime barrier,
and the cache is written into a temporary sibling renamed into place, so concurrent runs never see half of it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ..artifacts import cache_root, replace_dir
from ..tokenizer import LFM2Tokenizer
from .chat_dataset import ChatRows, EncodedRows, bundled_rows, dataset_fingerprint, load_chat_rows, load_difficulty
from .chat_shards import (
    ChatSettings,
    ChatShards,
    digest,
    encoding_identity,
    tokenizer_identity,
    verify_chat_shards,
    write_chat_shards,
)
from .format import MANIFEST, DataFormatError, check_compatible, load_manifest, load_order, sha256_file
from .preference import PreferencePairs

log = logging.getLogger(__name__)

STALE_TEMPORARY_S = 24 * 3600  # a cache temporary this old belongs to a killed run, not a slow one


def cache_dir(identity: dict[str, Any]) -> Path:
    return cache_root() / "chat_shards" / f"{identity['settings']['kind']}-{digest(identity)[:20]}"


@dataclass
class ChatSource:
    """What an SFT stage knows of its rows: where they came from, their fingerprint and count, their columns
    (parsed on first use: a cached run tokenises nothing, and parses nothing unless a column is asked for),
    and the chat shards holding their encoding."""

    source: str
    fingerprint: str
    n_rows: int
    shards: ChatShards
    loader: Callable[[], ChatRows] | None = None  # None: only shards were given (data.path)
    order: np.ndarray | None = None  # data.order's permutation of the examples; None = the stage decides
    curriculum: dict[str, Any] | None = None  # what to record about `order`
    cache: str | None = None  # hit | written, for rows tokenised into the cache
    _rows: ChatRows | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.n_rows

    def column(self, name: str) -> list[Any]:
        if self.loader is None:
            raise ValueError(f"{self.shards.directory} holds chat shards, not rows: a column ({name!r}) is not "
                             f"available; order it with data.order (an order file of the chat_shards job)")
        if self._rows is None:
            rows = self.loader()
            if rows.fingerprint != self.fingerprint:
                raise DataFormatError(f"{self.source} changed while it was read (fingerprint {rows.fingerprint[:12]}… "
                                      f"!= {self.fingerprint[:12]}…)")
            self._rows = rows
        return self._rows.column(name)

    @property
    def inputs(self) -> dict[str, Any]:
        """For the output manifest's `inputs`."""
        return {"directory": str(self.shards.directory), "manifest_hash": self.shards.manifest.hash(),
                "cache": self.cache}


@dataclass
class RowSource:
    """Rows identified by content before they are parsed: a dataset path or the generated bundled task."""

    source: str
    fingerprint: str
    load: Callable[[], ChatRows]

    @classmethod
    def from_stage(cls, stage: DictConfig) -> RowSource:
        """`stage.dataset` (jsonl / json / parquet / csv file or directory), or — sft only, when it is
        unset — the bundled chat arithmetic rows `stage.bundled_*` describe."""
        if stage.dataset is None:
            rows = bundled_rows(stage.bundled_rows, stage.bundled_seed, stage.bundled_levels)
            return cls(rows.source, rows.fingerprint, lambda: rows)
        path = str(Path(stage.dataset))  # as `load_chat_rows` names its source
        split, cache = stage.split, stage.get("cache_dir")
        return cls(path, dataset_fingerprint(path), lambda: load_chat_rows(path, split=split, cache_dir=cache))


def cached_shards(rows: RowSource, tokenizer: LFM2Tokenizer, settings: ChatSettings, runtime: Any = None,
                  verify: bool = True) -> tuple[ChatShards, str]:
    """The chat shards of `rows`, tokenised into the cache on first use: (shards, "hit" | "written").

    Rank 0 writes (a broken JSONL file is named with its line before anything is written), the other ranks
    wait at the runtime barrier, as for the bundled corpus. Every rank takes the barrier exactly once, also
    when rank 0 fails, so the others then fail reading the directory instead of hanging.
    """
    identity = encoding_identity(rows.fingerprint, tokenizer, settings)
    directory = cache_dir(identity)
    status = "hit"
    main = runtime is None or runtime.is_main
    if main:
        try:
            status = _fill_cache(directory, identity, rows, tokenizer, settings, verify)
        finally:
            if runtime is not None:
                runtime.barrier()
    elif runtime is not None:
        runtime.barrier()
    return ChatShards(directory), status


def _cache_complete(directory: Path, identity: dict[str, Any], verify: bool) -> bool:
    """Whether `directory` holds the finished cache for `identity` (a damaged one is logged and is not)."""
    if not (directory / MANIFEST).is_file():
        return False
    try:
        manifest = load_manifest(directory)
        if manifest.extra.get("config_hash") != digest(identity):
            return False
        if verify:
            verify_chat_shards(directory, manifest)
    except DataFormatError as err:
        log.warning("%s is damaged (%s); tokenising again", directory, err)
        return False
    return True


def _fill_cache(directory: Path, identity: dict[str, Any], rows: RowSource, tokenizer: LFM2Tokenizer,
                settings: ChatSettings, verify: bool) -> str:
    """"hit", or "written" after tokenising the rows into a private temporary sibling that is then renamed
    into place: runs started together on the same rows (a sweep) each see a whole directory or none, and
    the first rename wins."""
    if _cache_complete(directory, identity, verify):
        return "hit"
    loaded = rows.load()
    if loaded.fingerprint != rows.fingerprint:
        raise DataFormatError(f"{rows.source} changed while it was read (fingerprint {loaded.fingerprint[:12]}… "
                              f"!= {rows.fingerprint[:12]}…)")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):  # left by a killed run long ago
        if time.time() - stale.stat().st_mtime > STALE_TEMPORARY_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write_chat_shards(tmp, loaded, tokenizer, settings, allow_empty=True, copy_tokenizer=False,
                          extra={"job": "lfm2_train.data.chat_shards (stage cache)"})
        if not directory.exists():
            try:
                os.rename(tmp, directory)
                return "written"
            except OSError:  # another run renamed its copy first
                pass
        if not _cache_complete(directory, identity, verify):
            replace_dir(tmp, directory)  # a damaged directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return "written"


def open_stage_shards(path: str | Path, tokenizer: LFM2Tokenizer, settings: ChatSettings,
                      verify: bool = True) -> ChatShards:
    """Chat shards given to a stage as `data.path`: of the stage's kind, made with its tokenizer and chat
    template, for at most its `data.seq_len`; verified against the manifest when `verify`."""
    p = Path(path)
    what = "chat shards from data.path, or rows from stage.dataset"
    if not p.is_dir():
        raise DataFormatError(f"data.path={p} does not exist (stage={settings.kind} reads {what})")
    manifest = load_manifest(p)
    shards = ChatShards(p, manifest)
    if shards.kind != settings.kind:
        raise DataFormatError(f"data.path={p} holds {shards.kind} chat shards; stage={settings.kind} needs "
                              f"{settings.kind} shards (data_pipelines.chat_shards kind={settings.kind})")
    check_compatible(manifest, tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=None, source=f"data.path={p}")
    mine, theirs = tokenizer_identity(tokenizer), shards.chat["tokenizer"]
    differ = sorted(k for k in mine if k != "fingerprint" and mine[k] != theirs.get(k))
    if differ:
        raise DataFormatError(f"data.path={p} was rendered with another chat template or special tokens than the "
                              f"run's tokenizer ({', '.join(differ)} differ): rebuild it with that tokenizer")
    made_for = int(shards.settings["seq_len"])
    if made_for > settings.seq_len:
        raise DataFormatError(f"data.path={p} was made for data.seq_len={made_for}; this run has data.seq_len="
                              f"{settings.seq_len}, so some documents would not fit: rebuild it with "
                              f"seq_len={settings.seq_len}")
    if verify:
        verify_chat_shards(p, manifest)
    return shards


def _order_of(shards: ChatShards, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    order, meta = load_order(shards.directory, name, shards.manifest)
    record = {"source": "order", "order": name, "sha256": meta.get("sha256")}
    record.update({k: meta[k] for k in ("method", "n_buckets", "seed", "difficulty") if k in meta})
    return order, record


def open_sft(stage: DictConfig, data: DictConfig, tokenizer: LFM2Tokenizer,
             runtime: Any = None) -> tuple[ChatSource, EncodedRows]:
    """The SFT stage's data: (what it knows of the rows, the encoded conversations read from chat shards).

    `data.path` names sft chat shards (`data.order` an order file in them); otherwise `stage.dataset` (or
    the bundled task) is tokenised once into the cache. Raises ValueError when no conversation is usable.
    """
    settings = ChatSettings("sft", data.seq_len, split=stage.split, messages_field=stage.messages_field,
                            tools_field=stage.tools_field)
    if data.path is not None:
        if stage.dataset is not None:
            raise ValueError("stage=sft reads chat shards from data.path or rows from stage.dataset, not both")
        if stage.curriculum.source != "none":
            raise ValueError("with data.path the order comes from data.order (an order file that "
                             "data_pipelines.chat_shards writes with difficulty.source=...); stage.curriculum "
                             "orders stage.dataset rows")
        shards = open_stage_shards(data.path, tokenizer, settings, verify=data.verify_hashes)
        order, curriculum = _order_of(shards, data.order) if data.order else (None, None)
        source = ChatSource(shards.source, shards.fingerprint, shards.n_rows, shards, order=order,
                            curriculum=curriculum)
    else:
        if data.order is not None:
            raise ValueError("data.order names an order file of data.path's chat shards; stage.dataset rows are "
                             "ordered with stage.curriculum")
        rows = RowSource.from_stage(stage)
        shards, status = cached_shards(rows, tokenizer, settings, runtime, verify=data.verify_hashes)
        source = ChatSource(rows.source, rows.fingerprint, shards.n_rows, shards, loader=rows.load, cache=status)
    encoded = EncodedRows(shards.sft_examples(), shards.row_index, shards.skipped, shards.n_rows)
    if not len(encoded.examples):
        raise ValueError(f"{source.source}: no usable conversation ({encoded.describe()})")
    return source, encoded


def open_preference(stage: DictConfig, data: DictConfig, tokenizer: LFM2Tokenizer,
                    runtime: Any = None) -> PreferencePairs:
    """The preference stage's pairs, read from chat shards: `data.path`, or `stage.dataset` tokenised once
    into the cache. Raises ValueError when no pair is usable."""
    settings = ChatSettings("preference", data.seq_len, split=stage.split, plain_text=stage.plain_text)
    if data.order is not None:
        raise ValueError("stage=preference shuffles its pairs every epoch; data.order (a curriculum order) is "
                         "for stage=sft and stage=pretrain — unset it")
    if data.path is not None:
        if stage.dataset is not None:
            raise ValueError("stage=preference reads chat shards from data.path or pairs from stage.dataset, "
                             "not both")
        shards = open_stage_shards(data.path, tokenizer, settings, verify=data.verify_hashes)
        status = None
    else:
        if stage.dataset is None:
            raise ValueError("stage=preference needs stage.dataset=<jsonl / parquet / dataset directory of pairs> "
                             "or data.path=<preference chat shards>")
        shards, status = cached_shards(RowSource.from_stage(stage), tokenizer, settings, runtime,
                                       verify=data.verify_hashes)
    source = shards.source if data.path is not None else str(Path(stage.dataset))
    pairs = PreferencePairs(shards.pairs(), source, shards.fingerprint, shards.skipped, shards.n_rows,
                            shards={"directory": str(shards.directory), "manifest_hash": shards.manifest.hash(),
                                    "cache": status})
    if not pairs.pairs:
        raise ValueError(f"no usable preference pair in {pairs.describe()}")
    return pairs


# ---------------------------------------------------------------------------------------------- difficulty
def example_difficulty(rows: Any, row_index: np.ndarray, *, source: str, column: str = "difficulty",
                       file: str | None = None, keys: str = "difficulty") -> tuple[np.ndarray | None, dict[str, Any]]:
    """Difficulty (higher = harder) of each example, from a row column or a `sft_difficulty` file checked
    against the rows' fingerprint, with what to record about it. One rule for `stage.curriculum` and the
    `chat_shards` job; `keys` is where the caller's settings live (`stage.curriculum`), for the errors."""
    if source == "none":
        return None, {"source": "none"}
    if source == "column":
        try:
            values = np.array(rows.column(column), dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{keys}.column={column!r}: values are not numbers ({err})") from err
        record: dict[str, Any] = {"source": "column", "column": column}
    elif source == "file":
        if not file:
            raise ValueError(f"{keys}.source=file needs {keys}.file=<difficulty file>")
        values, header = load_difficulty(file, dataset_fingerprint=rows.fingerprint, n_rows=len(rows),
                                         require_complete=False)  # only the usable rows need a value
        record = {"source": "file", "file": str(file), "method": header["method"], "file_sha256": sha256_file(file)}
    else:
        raise ValueError(f"{keys}.source={source!r}; choose one of ['none', 'column', 'file']")
    per_example = values[row_index]
    if np.isnan(per_example).any():
        missing = row_index[np.isnan(per_example)]
        raise ValueError(f"curriculum ({record}): {len(missing)} usable rows have no difficulty (first: row "
                         f"{int(missing[0])}); score them or predict them with method=classifier")
    return per_example, record
