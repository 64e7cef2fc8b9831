"""SFT conversations and preference pairs as token shards, in the pre-training shard format.

A chat-shard directory is a `format.py` dataset directory (`manifest.json`, `shard-NNNNN.bin/.idx`,
`scores/`, `order/`, `tokenizer/`) with two side files per shard:

    shard-00000.mask     uint8, one per token. sft: 1 where the token carries a label (an assistant turn's
                         content and its end-of-turn token), else 0. preference: 0 prompt, 1 chosen, 2 rejected.
    shard-00000.rows     int64, one per document: the dataset row the document was made from.

A document is one conversation (sft) or one pair laid out as prompt + chosen + rejected (preference): the
exact ids the stage trains on, rendered with the tokenizer's chat template by `chat.encode_conversation` /
`preference.encode_pair`. Documents never span shards and, unlike pre-training text, are not followed by a
separator. `manifest.extra["chat"]` says what the directory holds: the kind, where the rows came from (path
and the `chat_dataset` fingerprint of their bytes), the settings they were encoded with (sequence length,
fields, the chat template's sha256), the skip counts, and the sha256 of every side file. Since the manifest
hash covers all of it, an order file (`format.save_order`) is tied to the masks too.

`write_chat_shards` writes a directory the way the tokenize job does: shard by shard with a checkpoint after
each (a rerun resumes), manifest last. The `data_pipelines.chat_shards` job calls it; so do `open_sft` /
`open_preference` when a stage is given rows (`stage.dataset`): the rows are tokenised once into a directory
under `$LFM2_TRAIN_CACHE/chat_shards/` named by a hash of their bytes, the tokenizer, its chat template and
the settings, and every later run with the same inputs reads the shards without tokenising anything. The
cache is written into a temporary sibling and renamed into place, so concurrent runs never see half of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ..artifacts import replace_dir
from ..tokenizer import LFM2Tokenizer
from .chat import EncodedChat
from .chat_dataset import (
    ChatRows,
    EncodedRows,
    bundled_rows,
    dataset_fingerprint,
    iter_encoded,
    load_chat_rows,
    load_difficulty,
)
from .format import (
    MANIFEST,
    DataFormatError,
    Manifest,
    ShardInfo,
    ShardReader,
    check_compatible,
    load_manifest,
    load_order,
    sha256_file,
    token_dtype,
    verify_shards,
    write_array_atomic,
    write_json_atomic,
    write_shard,
)
from .packed import IGNORE_INDEX
from .preference import EncodedPair, PairFormatError, PreferencePairs, encode_pair

log = logging.getLogger(__name__)

CHAT_FORMAT = "lfm2_train.chat_shards/1"
KINDS = ("sft", "preference")
STATE_FILE = "chat_shards_state.json"
STATE_VERSION = 1
DEFAULT_SHARD_TOKENS = 16_777_216
STALE_TEMPORARY_S = 24 * 3600  # a cache temporary this old belongs to a killed run, not a slow one
PROMPT, CHOSEN, REJECTED = 0, 1, 2  # preference mask values
# Files a writer creates (shards, side files, their temporaries): the only ones it ever deletes.
_OURS = re.compile(r"^(shard-\d{5}\.(bin|idx|mask|rows)|\.shard-\d{5}\.(bin|idx|mask|rows)\.tmp"
                   r"|\.(manifest|chat_shards_state)\.json\.tmp-\d+)$")


class ChatShardsError(ValueError):
    """A chat-shard output directory that cannot be written as asked (another dataset, another job)."""


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ChatSettings:
    """How rows become documents; `seq_len` is the reading stage's `data.seq_len`."""

    kind: str  # sft | preference
    seq_len: int
    split: str = "train"
    messages_field: str = "messages"  # sft
    tools_field: str | None = "tools"  # sft
    plain_text: str = "chat"  # preference: chat | raw

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"chat shards kind={self.kind!r}; choose one of {list(KINDS)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be >= 2")
        if self.plain_text not in ("chat", "raw"):
            raise ValueError(f"plain_text={self.plain_text!r}; choose chat or raw")

    @property
    def max_length(self) -> int:
        """Longest document kept: a conversation of seq_len + 1 tokens fills a packed row of seq_len
        predictions; a pair's prompt + longer response must fit seq_len positions."""
        return self.seq_len + 1 if self.kind == "sft" else self.seq_len

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "seq_len": self.seq_len, "max_length": self.max_length,
                               "split": self.split}
        if self.kind == "sft":
            out.update(messages_field=self.messages_field, tools_field=self.tools_field)
        else:
            out["plain_text"] = self.plain_text
        return out


def tokenizer_identity(tokenizer: LFM2Tokenizer) -> dict[str, Any]:
    """Everything of the tokenizer that changes a document's ids: the vocabulary (fingerprint) and what the
    fingerprint leaves out, the chat template and the special tokens it renders."""
    return {"fingerprint": tokenizer.fingerprint(),
            "chat_template_sha256": hashlib.sha256(tokenizer.chat_template.encode("utf-8")).hexdigest(),
            "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
            "add_bos_token": tokenizer.add_bos_token}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _settings_hash(identity: dict[str, Any]) -> str:
    """The identity without the rows: an unfinished job with this hash but other rows starts over."""
    return _digest({k: v for k, v in identity.items() if k != "source_fingerprint"})


def encoding_identity(source_fingerprint: str, tokenizer: LFM2Tokenizer, settings: ChatSettings) -> dict[str, Any]:
    """What a chat-shard directory's content is a function of; its hash names the stage cache directory."""
    return {"format": CHAT_FORMAT, "settings": settings.to_dict(), "tokenizer": tokenizer_identity(tokenizer),
            "source_fingerprint": source_fingerprint}


def cache_root() -> Path:
    """`$LFM2_TRAIN_CACHE` (default ~/.cache/lfm2_train): shared with the bundled corpus and the caches."""
    return Path(os.environ.get("LFM2_TRAIN_CACHE", Path.home() / ".cache" / "lfm2_train"))


def cache_dir(identity: dict[str, Any]) -> Path:
    return cache_root() / "chat_shards" / f"{identity['settings']['kind']}-{_digest(identity)[:20]}"


# ---------------------------------------------------------------------------------------------- encoding
def _documents(rows: ChatRows, tokenizer: LFM2Tokenizer, settings: ChatSettings,
               start: int) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray] | str]]:
    """(row, (ids, mask) or its skip reason) for every row from `start` on, in order."""
    if settings.kind == "sft":
        for i, enc in iter_encoded(tokenizer, rows, max_length=settings.max_length,
                                   messages_field=settings.messages_field, tools_field=settings.tools_field,
                                   start=start):
            if isinstance(enc, str):
                yield i, enc
                continue
            ids = np.asarray(enc.input_ids, dtype=np.int64)
            labels = np.asarray(enc.labels, dtype=np.int64)
            mask = labels != IGNORE_INDEX
            if not np.array_equal(labels[mask], ids[mask]):  # the mask must say everything the labels say
                raise AssertionError(f"row {i}: labels differ from the ids they mark")
            yield i, (ids, mask.astype(np.uint8))
        return
    for i in range(start, len(rows)):
        try:
            pair = encode_pair(tokenizer, rows.rows[i], max_length=settings.max_length,
                               plain_text=settings.plain_text, index=i)
        except PairFormatError as err:
            yield i, err.reason
            continue
        ids = np.asarray(pair.prompt + pair.chosen + pair.rejected, dtype=np.int64)
        mask = np.repeat(np.array([PROMPT, CHOSEN, REJECTED], dtype=np.uint8),
                         [len(pair.prompt), len(pair.chosen), len(pair.rejected)])
        yield i, (ids, mask)


# ---------------------------------------------------------------------------------------------- writing
def _side_hashes(out: Path, name: str) -> dict[str, str]:
    return {"name": name, "mask_sha256": sha256_file(out / f"{name}.mask"),
            "rows_sha256": sha256_file(out / f"{name}.rows")}


def _shard_ok(out: Path, info: ShardInfo, side: dict[str, str]) -> bool:
    files = ((f"{info.name}.bin", info.sha256), (f"{info.name}.idx", info.idx_sha256),
             (f"{info.name}.mask", side["mask_sha256"]), (f"{info.name}.rows", side["rows_sha256"]))
    return all((out / n).is_file() and sha256_file(out / n) == digest for n, digest in files)


def _remove_ours(out: Path, keep: set[str]) -> list[str]:
    removed = []
    for p in sorted(out.iterdir()):
        if p.is_file() and _OURS.match(p.name) and p.name not in keep:
            p.unlink()
            removed.append(p.name)
    return removed


def _wipe(out: Path) -> None:
    """Remove a dataset of ours: manifest, state, shards and side files, scores/ and order/."""
    for name in (MANIFEST, STATE_FILE):
        (out / name).unlink(missing_ok=True)
    for side in ("scores", "order"):
        if (out / side).is_dir():
            shutil.rmtree(out / side)
    _remove_ours(out, keep=set())


def verify_chat_shards(directory: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Re-hash every shard and side file against the manifest; raise naming the first file that differs."""
    directory = Path(directory)
    manifest = verify_shards(directory, manifest)
    for side in _chat_extra(manifest, directory)["side_files"]:
        for suffix in ("mask", "rows"):
            path = directory / f"{side['name']}.{suffix}"
            if not path.is_file():
                raise DataFormatError(f"{path} is listed in the manifest but missing")
            if sha256_file(path) != side[f"{suffix}_sha256"]:
                raise DataFormatError(f"{path} does not match the sha256 in {directory / MANIFEST}: modified?")
    return manifest


def _chat_extra(manifest: Manifest, directory: Path) -> dict[str, Any]:
    chat = manifest.extra.get("chat")
    if not isinstance(chat, dict) or chat.get("format") != CHAT_FORMAT:
        raise DataFormatError(f"{directory} holds token shards but not chat shards (its manifest has no "
                              f"extra.chat of format {CHAT_FORMAT!r}); write chat shards with "
                              f"`python -m data_pipelines.chat_shards`")
    return chat


def _prepare_output(out: Path, identity: dict[str, Any], overwrite: bool,
                    verify: bool) -> dict[str, Any] | None:
    """Refuse / already done / resume / fresh start, as the tokenize job decides: returns
    `{"complete": Manifest}`, a state dict to resume from, or None (leftovers of ours cleared)."""
    identity_hash = _digest(identity)
    settings_hash = _settings_hash(identity)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _wipe(out)
        return None
    if (out / MANIFEST).is_file():
        try:
            manifest = load_manifest(out)
        except DataFormatError as err:
            raise ChatShardsError(f"{out} holds an unreadable dataset ({err}); set overwrite=true to replace it") \
                from None
        if manifest.extra.get("config_hash") != identity_hash:
            raise ChatShardsError(f"{out} holds a finished dataset made from other rows or settings (config_hash "
                                  f"{str(manifest.extra.get('config_hash'))[:12]}…, this one {identity_hash[:12]}…); "
                                  f"choose another output_dir or set overwrite=true")
        if verify:
            try:
                verify_chat_shards(out, manifest)
            except DataFormatError as err:
                raise ChatShardsError(f"{out} holds this dataset but {err}; set overwrite=true to rebuild it") \
                    from None
        return {"complete": manifest}
    state_path = out / STATE_FILE
    if not state_path.is_file():
        _remove_ours(out, keep=set())  # killed before its first shard
        return None
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        raise ChatShardsError(f"{state_path} is corrupt; set overwrite=true to start over") from None
    if state.get("version") != STATE_VERSION or state.get("settings_hash") != settings_hash:
        raise ChatShardsError(f"{out} holds an unfinished job with other settings or another tokenizer; choose "
                              f"another output_dir or set overwrite=true to discard it")
    if state.get("identity_hash") != identity_hash:
        log.warning("%s: the rows changed since the interrupted run; starting over", out)
        _wipe(out)
        return None
    kept = []
    for entry in state["shards"]:
        if not _shard_ok(out, ShardInfo(**entry["info"]), entry["side"]):
            log.warning("%s does not match its checkpoint; redoing it and everything after it", entry["info"]["name"])
            break
        kept.append(entry)
    state["shards"] = kept
    _remove_ours(out, keep={f"{e['info']['name']}.{x}" for e in kept for x in ("bin", "idx", "mask", "rows")})
    return state


def write_chat_shards(directory: str | Path, rows: ChatRows, tokenizer: LFM2Tokenizer, settings: ChatSettings, *,
                      shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False, verify: bool = True,
                      allow_empty: bool = False, stop_after_shards: int | None = None, copy_tokenizer: bool = True,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode `rows` into chat shards under `directory`; resumable, manifest written last.

    A directory that already holds this dataset (same rows, tokenizer, template and settings) is verified
    (`verify`) and left alone; one holding another dataset is refused unless `overwrite`. `allow_empty`
    writes a dataset with no usable document (its skip counts say why) instead of raising ValueError.
    Returns a summary: status (complete / already_complete / stopped), directory, counts.
    """
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out = Path(directory)
    identity = encoding_identity(rows.fingerprint, tokenizer, settings)
    state = _prepare_output(out, identity, overwrite, verify)
    if state is not None and "complete" in state:
        return _summary("already_complete", out, state["complete"])
    dtype = token_dtype(tokenizer.vocab_size)
    entries: list[dict[str, Any]] = state["shards"] if state else []
    state_doc = {"version": STATE_VERSION, "identity_hash": _digest(identity),
                 "settings_hash": _settings_hash(identity), "shards": entries}
    start = entries[-1]["next_row"] if entries else 0
    skipped = Counter(entries[-1]["skipped"]) if entries else Counter()
    parts: list[tuple[int, np.ndarray, np.ndarray]] = []
    n_tokens, written = 0, 0

    def flush(next_row: int) -> None:
        name = f"shard-{len(entries):05d}"
        offsets = np.concatenate([[0], np.cumsum([len(p[1]) for p in parts])]).astype(np.int64)
        info = write_shard(out, name, np.concatenate([p[1] for p in parts]).astype(dtype), offsets)
        write_array_atomic(out / f"{name}.mask", np.concatenate([p[2] for p in parts]))
        write_array_atomic(out / f"{name}.rows", np.array([p[0] for p in parts], dtype=np.int64))
        entries.append({"info": asdict(info), "side": _side_hashes(out, name), "next_row": next_row,
                        "skipped": dict(skipped)})
        write_json_atomic(out / STATE_FILE, state_doc)

    for i, doc in _documents(rows, tokenizer, settings, start):
        if isinstance(doc, str):
            skipped[doc] += 1
            continue
        if parts and n_tokens + len(doc[0]) > shard_tokens:
            flush(next_row=i)
            parts, n_tokens, written = [], 0, written + 1
            if stop_after_shards is not None and written >= stop_after_shards:
                return {"status": "stopped", "output_dir": str(out), "shards": len(entries)}
        parts.append((i, doc[0], doc[1]))
        n_tokens += len(doc[0])
    if parts:
        flush(next_row=len(rows))
    infos = [ShardInfo(**e["info"]) for e in entries]
    n_docs = sum(s.documents for s in infos)
    if n_docs == 0 and not allow_empty:
        what = "conversation" if settings.kind == "sft" else "preference pair"
        raise ValueError(f"{rows.source}: no usable {what} ({len(rows)} rows; skipped: "
                         f"{', '.join(f'{k}={v}' for k, v in sorted(skipped.items())) or 'none'})")
    chat = {"format": CHAT_FORMAT, "kind": settings.kind, "source": rows.source, "source_fingerprint": rows.fingerprint,
            "n_rows": len(rows), "skipped": dict(sorted(skipped.items())), "settings": settings.to_dict(),
            "tokenizer": identity["tokenizer"], "side_files": [e["side"] for e in entries]}
    sep = tokenizer.eod_token_id if tokenizer.eod_token_id is not None else tokenizer.eos_token_id
    manifest = Manifest(
        tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=tokenizer.vocab_size, dtype=dtype.name,
        separator_id=sep, shards=infos,
        sources=[{"name": settings.kind, "path": rows.source, "rows": len(rows), "documents": n_docs,
                  "tokens": sum(s.tokens for s in infos)}],
        extra={**(extra or {}), "config_hash": _digest(identity), "chat": chat})
    if copy_tokenizer:
        tokenizer.save_pretrained(out / "tokenizer")
    manifest.save(out)  # last: from here on the directory is a dataset
    (out / STATE_FILE).unlink(missing_ok=True)
    return _summary("complete", out, manifest)


def _summary(status: str, out: Path, manifest: Manifest) -> dict[str, Any]:
    chat = manifest.extra["chat"]
    return {"status": status, "output_dir": str(out), "kind": chat["kind"], "shards": len(manifest.shards),
            "rows": chat["n_rows"], "documents": manifest.num_documents, "tokens": manifest.num_tokens,
            "skipped": chat["skipped"], "manifest_hash": manifest.hash()}


# ---------------------------------------------------------------------------------------------- reading
class ChatShards:
    """Random access to the documents of a chat-shard directory (token ids memory-mapped)."""

    def __init__(self, directory: str | Path, manifest: Manifest | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest or load_manifest(self.directory)
        self.chat = _chat_extra(self.manifest, self.directory)
        self.reader = ShardReader(self.directory, self.manifest)
        names = [s.name for s in self.manifest.shards]
        self._masks = [np.memmap(self.directory / f"{n}.mask", dtype=np.uint8, mode="r") for n in names]
        self._offsets = [np.fromfile(self.directory / f"{n}.idx", dtype=np.int64) for n in names]
        rows = [np.fromfile(self.directory / f"{n}.rows", dtype=np.int64) for n in names]
        self.row_index = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        if len(self.row_index) != len(self.reader):
            raise DataFormatError(f"{self.directory}: {len(self.row_index)} row indices for {len(self.reader)} "
                                  f"documents")

    @property
    def kind(self) -> str:
        return self.chat["kind"]

    @property
    def source(self) -> str:
        """Where the rows came from (a path, or the bundled task's description)."""
        return self.chat["source"]

    @property
    def fingerprint(self) -> str:
        """`ChatRows.fingerprint` of those rows: what difficulty files are checked against."""
        return self.chat["source_fingerprint"]

    @property
    def n_rows(self) -> int:
        return int(self.chat["n_rows"])

    @property
    def settings(self) -> dict[str, Any]:
        return self.chat["settings"]

    @property
    def skipped(self) -> Counter:
        """Skip reason -> rows, for the rows that made no document."""
        return Counter(self.chat["skipped"])

    def __len__(self) -> int:
        return len(self.reader)

    def document(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, mask) of document `i`."""
        shard, j = self.reader.locate(i)
        lo, hi = self._offsets[shard][j], self._offsets[shard][j + 1]
        return self.reader.document(i), self._masks[shard][lo:hi]

    def sft_examples(self) -> ShardExamples:
        self._expect("sft")
        return ShardExamples(self)

    def pairs(self) -> list[EncodedPair]:
        """Every pair, as `preference.encode_pair` made it."""
        self._expect("preference")
        out = []
        for i in range(len(self)):
            ids, mask = self.document(i)
            p, c = np.searchsorted(mask, [CHOSEN, REJECTED])  # the mask is 0...0 1...1 2...2
            ids = ids.tolist()
            out.append(EncodedPair(tuple(ids[:p]), tuple(ids[p:c]), tuple(ids[c:]), int(self.row_index[i])))
        return out

    def _expect(self, kind: str) -> None:
        if self.kind != kind:
            raise DataFormatError(f"{self.directory} holds {self.kind} chat shards, not {kind}")


class ShardExamples(Sequence[EncodedChat]):
    """The conversations of sft chat shards as `EncodedChat`s, read on access (what `SFTStream` indexes)."""

    def __init__(self, shards: ChatShards) -> None:
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> EncodedChat:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"chat shard examples are indexed by integers, not {type(i).__name__}")
        i = int(i) + (len(self) if i < 0 else 0)
        ids, mask = self.shards.document(i)
        ids = ids.astype(np.int64)
        return EncodedChat(ids.tolist(), np.where(mask.astype(bool), ids, IGNORE_INDEX).tolist())


# ---------------------------------------------------------------------------------------------- stages
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
        if manifest.extra.get("config_hash") != _digest(identity):
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
                       file: str | None = None) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Difficulty (higher = harder) of each example, from a row column or a `sft_difficulty` file checked
    against the rows' fingerprint — the rule of `stage.curriculum` — with what to record about it."""
    if source == "none":
        return None, {"source": "none"}
    if source == "column":
        try:
            values = np.array(rows.column(column), dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"difficulty column {column!r}: values are not numbers ({err})") from err
        record: dict[str, Any] = {"source": "column", "column": column}
    elif source == "file":
        if not file:
            raise ValueError("difficulty source=file needs file=<difficulty file>")
        values, header = load_difficulty(file, dataset_fingerprint=rows.fingerprint, n_rows=len(rows),
                                         require_complete=False)  # only the usable rows need a value
        record = {"source": "file", "file": str(file), "method": header["method"], "file_sha256": sha256_file(file)}
    else:
        raise ValueError(f"difficulty source={source!r}; choose none, column or file")
    per_example = values[row_index]
    if np.isnan(per_example).any():
        missing = row_index[np.isnan(per_example)]
        raise ValueError(f"difficulty ({record}): {len(missing)} usable rows have no difficulty (first: row "
                         f"{int(missing[0])}); score them or predict them with method=classifier")
    return per_example, record
