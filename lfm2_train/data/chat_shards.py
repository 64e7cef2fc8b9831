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
each (a rerun resumes), manifest last; `ChatShards` reads one. The `data_pipelines.chat_shards` job and the
stages' shard cache (`chat_sources.py`) both write through it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..tokenizer import LFM2Tokenizer
from .chat import EncodedChat
from .chat_dataset import ChatRows, iter_encoded
from .format import (
    MANIFEST,
    DataFormatError,
    Manifest,
    ShardInfo,
    ShardReader,
    load_manifest,
    remove_own_files,
    sha256_file,
    token_dtype,
    verify_shards,
    wipe_dataset,
    write_array_atomic,
    write_json_atomic,
    write_shard,
)
from .packed import IGNORE_INDEX
from .preference import EncodedPair, PairFormatError, encode_pair

log = logging.getLogger(__name__)

CHAT_FORMAT = "lfm2_train.chat_shards/1"
KINDS = ("sft", "preference")
STATE_FILE = "chat_shards_state.json"
STATE_VERSION = 1
DEFAULT_SHARD_TOKENS = 16_777_216
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


def digest(data: Any) -> str:
    """sha256 of the canonical JSON of `data`: how identities become names and config hashes."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _settings_hash(identity: dict[str, Any]) -> str:
    """The identity without the rows: an unfinished job with this hash but other rows starts over."""
    return digest({k: v for k, v in identity.items() if k != "source_fingerprint"})


def encoding_identity(source_fingerprint: str, tokenizer: LFM2Tokenizer, settings: ChatSettings) -> dict[str, Any]:
    """What a chat-shard directory's content is a function of; its hash names the stage cache directory."""
    return {"format": CHAT_FORMAT, "settings": settings.to_dict(), "tokenizer": tokenizer_identity(tokenizer),
            "source_fingerprint": source_fingerprint}


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
    identity_hash = digest(identity)
    settings_hash = _settings_hash(identity)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        wipe_dataset(out, _OURS, STATE_FILE)
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
        remove_own_files(out, _OURS)  # killed before its first shard
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
        wipe_dataset(out, _OURS, STATE_FILE)
        return None
    kept = []
    for entry in state["shards"]:
        if not _shard_ok(out, ShardInfo(**entry["info"]), entry["side"]):
            log.warning("%s does not match its checkpoint; redoing it and everything after it", entry["info"]["name"])
            break
        kept.append(entry)
    state["shards"] = kept
    own = {f"{e['info']['name']}.{x}" for e in kept for x in ("bin", "idx", "mask", "rows")}
    remove_own_files(out, _OURS, keep=own)
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
    state_doc = {"version": STATE_VERSION, "identity_hash": digest(identity),
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
        extra={**(extra or {}), "config_hash": digest(identity), "chat": chat})
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
