"""The on-disk token-shard format: the one contract between `data_pipelines/` (writers) and the trainer.

A dataset directory holds:

    manifest.json              what was tokenized, how, and the sha256 of every file below
    shard-00000.bin            token ids, raw little-endian uint16 (vocab <= 65,536) or uint32
    shard-00000.idx            int64 document offsets into the .bin: doc j = tokens[idx[j]:idx[j+1]]
    scores/<scorer>.npy        optional: float32, one difficulty score per document (global order)
    scores/<scorer>.json       its metadata, including the manifest hash it was computed against
    order/<name>.npy           optional: int64 curriculum order of global document indices
    order/<name>.json          its metadata (scorer, method, seed, pacing, manifest hash)

Documents never span shards; every document ends with the separator token (`<|endoftext|>`), so the
text of a document is `decode(tokens[:-1])`. Global document index = position in shard order, then
in-shard order. `manifest.json` is written last (atomically), so a directory without one is an
unfinished job, never a dataset.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Re-exported: DataFormatError, sha256_file and the atomic writers live in `artifacts`; many modules import
# them from here.
from ..artifacts import (
    DataFormatError,
    read_manifest,
    save_npy_atomic,
    sha256_file,
    sha256_json,
    write_array_atomic,
    write_json_atomic,
)

FORMAT_VERSION = "lfm2_train.shards/1"
MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class ShardInfo:
    name: str  # "shard-00000" (files name.bin / name.idx)
    tokens: int
    documents: int
    sha256: str  # of the .bin
    idx_sha256: str  # of the .idx


@dataclass
class Manifest:
    tokenizer_fingerprint: str
    vocab_size: int
    dtype: str  # "uint16" | "uint32"
    separator_id: int
    shards: list[ShardInfo]
    sources: list[dict[str, Any]] = field(default_factory=list)  # name, path, weight/budget, docs, tokens
    fim: dict[str, Any] = field(default_factory=dict)  # rate, spm share, which sources
    extra: dict[str, Any] = field(default_factory=dict)  # job config and anything else worth keeping
    format: str = FORMAT_VERSION

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_documents(self) -> int:
        return sum(s.documents for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["num_tokens"] = self.num_tokens
        out["num_documents"] = self.num_documents
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        if data.get("format") != FORMAT_VERSION:
            raise DataFormatError(f"{source}: format {data.get('format')!r} is not {FORMAT_VERSION!r}")
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
            return cls(
                tokenizer_fingerprint=data["tokenizer_fingerprint"], vocab_size=data["vocab_size"],
                dtype=data["dtype"], separator_id=data["separator_id"], shards=shards,
                sources=data.get("sources", []), fim=data.get("fim", {}), extra=data.get("extra", {}),
            )
        except (KeyError, TypeError) as err:
            raise DataFormatError(f"{source}: malformed manifest ({err})") from None

    def hash(self) -> str:
        """Identity of the dataset: ties scores, orders and teacher caches to exactly these shards."""
        return sha256_json(self.to_dict())

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        write_json_atomic(path, self.to_dict())
        return path


def load_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise FileNotFoundError(f"dataset directory {directory} does not exist")
    if not path.is_file():
        raise DataFormatError(f"{directory} has no {MANIFEST}: the tokenization job did not finish")
    return Manifest.from_dict(read_manifest(path) or {}, source=str(path))


def verify_shards(directory: str | Path, manifest: Manifest | None = None) -> Manifest:
    """Re-hash every shard file against the manifest; raise naming the first file that differs."""
    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    for shard in manifest.shards:
        for suffix, expected in ((".bin", shard.sha256), (".idx", shard.idx_sha256)):
            path = directory / f"{shard.name}{suffix}"
            if not path.is_file():
                raise DataFormatError(f"{path} is listed in the manifest but missing")
            if sha256_file(path) != expected:
                raise DataFormatError(f"{path} does not match the sha256 in {directory / MANIFEST}: modified?")
    return manifest


def check_compatible(manifest: Manifest, *, tokenizer_fingerprint: str | None, vocab_size: int | None,
                     source: str = "dataset") -> None:
    """Refuse data made with another tokenizer, or ids the model cannot embed, before any step runs."""
    if tokenizer_fingerprint is not None and manifest.tokenizer_fingerprint != tokenizer_fingerprint:
        raise DataFormatError(
            f"{source} was tokenized with tokenizer {manifest.tokenizer_fingerprint[:12]}…, the run uses "
            f"{tokenizer_fingerprint[:12]}…: re-tokenize or point the run at the matching tokenizer"
        )
    if vocab_size is not None and manifest.vocab_size > vocab_size:
        raise DataFormatError(
            f"{source} has token ids up to vocab size {manifest.vocab_size} but the model embeds only {vocab_size}"
        )
    # A model vocabulary a little larger than the tokenizer's is padding; one far larger means the data was
    # tokenized for another model (a 65,536-row embedding trained on a 512-token tokenizer's ids).
    if vocab_size is not None and vocab_size > 2 * manifest.vocab_size:
        raise DataFormatError(
            f"{source} was tokenized with a {manifest.vocab_size}-token vocabulary but the model has {vocab_size}: "
            f"tokenize the data with the model's tokenizer (data_pipelines.tokenize tokenizer=<dir>), or give the "
            f"model the tokenizer's vocabulary (model.overrides={{vocab_size: {manifest.vocab_size}}})"
        )


def write_shard(directory: str | Path, name: str, tokens: np.ndarray, offsets: np.ndarray) -> ShardInfo:
    """Write one shard (.bin then .idx, each atomically) and return its manifest entry."""
    directory = Path(directory)
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) <= 0):
        raise ValueError(f"shard {name}: offsets must start at 0, end at {len(tokens)} and strictly increase")
    for suffix, array in ((".bin", tokens), (".idx", offsets.astype(np.int64))):
        write_array_atomic(directory / f"{name}{suffix}", array)
    return ShardInfo(name=name, tokens=int(len(tokens)), documents=int(len(offsets) - 1),
                     sha256=sha256_file(directory / f"{name}.bin"), idx_sha256=sha256_file(directory / f"{name}.idx"))


class ShardReader:
    """Memory-mapped, random access to the documents of a dataset directory (no copy until sliced)."""

    def __init__(self, directory: str | Path, manifest: Manifest | None = None) -> None:
        self.directory = Path(directory)
        self.manifest = manifest or load_manifest(self.directory)
        dtype = np.dtype(self.manifest.dtype)
        self._tokens = [np.memmap(self.directory / f"{s.name}.bin", dtype=dtype, mode="r")
                        for s in self.manifest.shards]
        self._offsets = [np.fromfile(self.directory / f"{s.name}.idx", dtype=np.int64) for s in self.manifest.shards]
        counts = np.array([len(o) - 1 for o in self._offsets], dtype=np.int64)
        self._first_doc = np.concatenate([[0], np.cumsum(counts)])
        self._first_token = np.concatenate([[0], np.cumsum([s.tokens for s in self.manifest.shards])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._first_doc[-1])

    def locate(self, doc: int) -> tuple[int, int]:
        """Global document index -> (shard index, index within shard)."""
        if not 0 <= doc < len(self):
            raise IndexError(f"document {doc} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._first_doc, doc, side="right") - 1)
        return shard, doc - int(self._first_doc[shard])

    def document(self, doc: int) -> np.ndarray:
        """Token ids of one document, separator included."""
        shard, j = self.locate(doc)
        lo, hi = self._offsets[shard][j], self._offsets[shard][j + 1]
        return self._tokens[shard][lo:hi]

    def token_start(self, doc: int) -> int:
        """Global index of a document's first token (shards concatenated in manifest order): the key that
        aligns per-token side data such as a teacher cache."""
        shard, j = self.locate(doc)
        return int(self._first_token[shard] + self._offsets[shard][j])

    def doc_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------- side files
def _side_paths(directory: str | Path, kind: str, name: str) -> tuple[Path, Path]:
    base = Path(directory) / kind
    return base / f"{name}.npy", base / f"{name}.json"


def _save_side(directory: str | Path, kind: str, name: str, array: np.ndarray, meta: dict[str, Any],
               manifest: Manifest) -> Path:
    npy, js = _side_paths(directory, kind, name)
    npy.parent.mkdir(parents=True, exist_ok=True)
    save_npy_atomic(npy, array)
    write_json_atomic(js, {**meta, "name": name, "manifest_hash": manifest.hash(), "sha256": sha256_file(npy),
                           "length": int(len(array))})
    return npy


def _load_side(directory: str | Path, kind: str, name: str, manifest: Manifest) -> tuple[np.ndarray, dict[str, Any]]:
    npy, js = _side_paths(directory, kind, name)
    if not npy.is_file() or not js.is_file():
        raise DataFormatError(f"{kind[:-1] if kind.endswith('s') else kind} {name!r} not found under {npy.parent}")
    meta = read_manifest(js) or {}
    if meta.get("manifest_hash") != manifest.hash():
        raise DataFormatError(f"{npy} was computed for different shards (manifest hash mismatch): recompute it")
    if sha256_file(npy) != meta.get("sha256"):
        raise DataFormatError(f"{npy} does not match the sha256 in {js}: modified?")
    return np.load(npy), meta


def save_scores(directory: str | Path, name: str, scores: np.ndarray, meta: dict[str, Any],
                manifest: Manifest | None = None) -> Path:
    """One float32 difficulty score per document (higher = harder), tied to the manifest hash."""
    manifest = manifest or load_manifest(directory)
    scores = np.asarray(scores, dtype=np.float32)
    if len(scores) != manifest.num_documents:
        raise ValueError(f"scores {name!r}: {len(scores)} values for {manifest.num_documents} documents")
    return _save_side(directory, "scores", name, scores, meta, manifest)


def load_scores(directory: str | Path, name: str, manifest: Manifest | None = None) -> tuple[np.ndarray, dict]:
    return _load_side(directory, "scores", name, manifest or load_manifest(directory))


def save_order(directory: str | Path, name: str, order: np.ndarray, meta: dict[str, Any],
               manifest: Manifest | None = None) -> Path:
    """A permutation of global document indices (easy -> hard for a curriculum), tied to the manifest."""
    manifest = manifest or load_manifest(directory)
    order = np.asarray(order, dtype=np.int64)
    if len(order) != manifest.num_documents or not np.array_equal(np.sort(order), np.arange(len(order))):
        raise ValueError(f"order {name!r} is not a permutation of the {manifest.num_documents} documents")
    return _save_side(directory, "order", name, order, meta, manifest)


def load_order(directory: str | Path, name: str, manifest: Manifest | None = None) -> tuple[np.ndarray, dict]:
    return _load_side(directory, "order", name, manifest or load_manifest(directory))


def remove_own_files(out: Path, ours: re.Pattern[str], keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete the files in `out` a shard writer made (names matching `ours`: shards, side files, temporaries)
    except `keep`; never anything else in the directory. -> the names removed."""
    removed = []
    for p in sorted(out.iterdir()):
        if p.is_file() and ours.match(p.name) and p.name not in keep:
            p.unlink()
            removed.append(p.name)
    return removed


def wipe_dataset(out: Path, ours: re.Pattern[str], state_file: str) -> None:
    """Remove a dataset a shard writer made (overwrite=true): its manifest, resume state, side directories
    (scores/, order/) and its own files."""
    for name in (MANIFEST, state_file):
        (out / name).unlink(missing_ok=True)
    for side in ("scores", "order"):
        if (out / side).is_dir():
            shutil.rmtree(out / side)
    remove_own_files(out, ours)
