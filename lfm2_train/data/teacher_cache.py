"""On-disk teacher top-K cache, aligned one-to-one with a dataset's token shards.

    teacher_manifest.json     what was cached from what (written last, atomically)
    topk-00000.ids            (tokens, K) token ids, uint16 when the vocabulary fits, else uint32
    topk-00000.lp             (tokens, K) teacher log-probs (log-softmax over the full vocabulary at T=1),
                              float16 or bfloat16 (stored as raw 2-byte words)

Row i of shard s describes the teacher's distribution for the token *after* token i of token shard s,
given the document up to token i. At K = 32 and 2-byte dtypes that is 128 bytes per token.
A cache refers to the dataset by its manifest hash, so it can never be read against other shards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import DataFormatError, read_manifest, sha256_file, write_array_atomic, write_json_atomic
from .format import Manifest
from .prefetch import local_rows

CACHE_FORMAT = "lfm2_train.teacher_cache/1"
CACHE_MANIFEST = "teacher_manifest.json"
LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CacheShard:
    name: str  # "topk-00000" -> .ids / .lp
    tokens: int
    ids_sha256: str
    lp_sha256: str


@dataclass
class CacheManifest:
    k: int
    vocab_size: int
    ids_dtype: str  # uint16 | uint32
    logprob_dtype: str  # float16 | bfloat16
    dataset_manifest_hash: str
    tokenizer_fingerprint: str
    teacher: dict[str, Any]  # path, model_type, num_parameters, weights hash where known
    shards: list[CacheShard]
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = CACHE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> CacheManifest:
        if data.get("format") != CACHE_FORMAT:
            raise DataFormatError(f"{source}: format {data.get('format')!r} is not {CACHE_FORMAT!r}")
        try:
            return cls(**{**data, "shards": [CacheShard(**s) for s in data["shards"]]})
        except (KeyError, TypeError) as err:
            raise DataFormatError(f"{source}: malformed teacher cache manifest ({err})") from None

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / CACHE_MANIFEST, self.to_dict())

    @property
    def bytes_per_token(self) -> int:
        return self.k * (np.dtype(self.ids_dtype).itemsize + 2)


def cache_shard_name(token_shard_name: str) -> str:
    """shard-00012 -> topk-00012: one cache shard per token shard."""
    return "topk-" + token_shard_name.split("-", 1)[1]


def encode_logprobs(lp: torch.Tensor, dtype: str) -> np.ndarray:
    """(n, K) float -> 2-byte words (bf16 has no numpy dtype, so both are stored as uint16 bit patterns)."""
    return lp.to(LOGPROB_DTYPES[dtype]).contiguous().view(torch.int16).numpy().view(np.uint16)


def decode_logprobs(words: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int16)).view(LOGPROB_DTYPES[dtype]).float()


def write_cache_shard(directory: str | Path, name: str, ids: np.ndarray, lp_words: np.ndarray) -> CacheShard:
    """Write .ids and .lp of one shard (each via a temporary file + rename) and return its manifest entry."""
    directory = Path(directory)
    for suffix, array in ((".ids", ids), (".lp", lp_words)):
        write_array_atomic(directory / f"{name}{suffix}", array)
    return CacheShard(name=name, tokens=int(ids.shape[0]), ids_sha256=sha256_file(directory / f"{name}.ids"),
                      lp_sha256=sha256_file(directory / f"{name}.lp"))


class TeacherCache:
    """Memory-mapped reader, validated against the dataset and the run before the first step."""

    def __init__(self, directory: str | Path, dataset: Manifest, *, k: int | None = None,
                 vocab_size: int | None = None, tokenizer_fingerprint: str | None = None,
                 verify_hashes: bool = True) -> None:
        self.directory = Path(directory)
        path = self.directory / CACHE_MANIFEST
        data = read_manifest(path)
        if data is None:
            raise DataFormatError(f"{self.directory} has no {CACHE_MANIFEST}: the cache_teacher stage did not finish")
        self.manifest = m = CacheManifest.from_dict(data, str(path))
        where = str(self.directory)
        if m.dataset_manifest_hash != dataset.hash():
            raise DataFormatError(f"teacher cache {where} was computed on other shards (dataset manifest hash "
                                  f"{m.dataset_manifest_hash[:12]}… != {dataset.hash()[:12]}…)")
        if k is not None and m.k != k:
            raise DataFormatError(f"teacher cache {where} holds K={m.k}, the run is configured for K={k}")
        if vocab_size is not None and m.vocab_size != vocab_size:
            raise DataFormatError(f"teacher cache {where} has vocabulary {m.vocab_size}, the student {vocab_size}")
        if tokenizer_fingerprint is not None and m.tokenizer_fingerprint != tokenizer_fingerprint:
            raise DataFormatError(f"teacher cache {where} was made with another tokenizer than the run's")
        if [s.tokens for s in m.shards] != [s.tokens for s in dataset.shards]:
            raise DataFormatError(f"teacher cache {where} does not align with the dataset's shards")
        self._ids, self._lp = [], []
        for shard in m.shards:
            for suffix, digest in ((".ids", shard.ids_sha256), (".lp", shard.lp_sha256)):
                file = self.directory / f"{shard.name}{suffix}"
                expected = shard.tokens * m.k * (np.dtype(m.ids_dtype).itemsize if suffix == ".ids" else 2)
                if not file.is_file() or file.stat().st_size != expected:
                    size = file.stat().st_size if file.is_file() else "missing"
                    raise DataFormatError(f"teacher cache file {file} is truncated or missing "
                                          f"({size} bytes, expected {expected})")
                if verify_hashes and sha256_file(file) != digest:
                    raise DataFormatError(f"teacher cache file {file} does not match its sha256: modified?")
            self._ids.append(np.memmap(self.directory / f"{shard.name}.ids", dtype=m.ids_dtype, mode="r",
                                       shape=(shard.tokens, m.k)))
            self._lp.append(np.memmap(self.directory / f"{shard.name}.lp", dtype=np.uint16, mode="r",
                                      shape=(shard.tokens, m.k)))
        self._base = np.concatenate([[0], np.cumsum([s.tokens for s in m.shards])]).astype(np.int64)

    @property
    def k(self) -> int:
        return self.manifest.k

    def gather(self, token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global token indices (any shape; negative = padding) -> (ids long, log-probs fp32), shape (..., K).

        Padding positions get id 0 and log-prob 0 (they are masked by the labels anyway)."""
        flat = token_index.reshape(-1).numpy()
        ids = np.zeros((len(flat), self.k), dtype=np.int64)
        words = np.zeros((len(flat), self.k), dtype=np.uint16)
        valid = flat >= 0
        shard = np.searchsorted(self._base, flat, side="right") - 1
        for s in np.unique(shard[valid]):
            rows = np.flatnonzero(valid & (shard == s))
            local = flat[rows] - self._base[s]
            ids[rows] = self._ids[s][local]
            words[rows] = self._lp[s][local]
        lp = decode_logprobs(words, self.manifest.logprob_dtype)
        lp[torch.from_numpy(~valid)] = 0.0
        shape = (*token_index.shape, self.k)
        return torch.from_numpy(ids).view(shape), lp.view(shape)


class TeacherBatches:
    """A token stream whose batches carry their teacher top-K (`teacher_ids` long, `teacher_logprobs` fp32,
    (B, T, K)), gathered where the batch is made — on the prefetch thread when the trainer prefetches —
    instead of inside the loss, in the step."""

    def __init__(self, stream: Any, cache: TeacherCache) -> None:
        self.stream, self.cache = stream, cache

    @property
    def state(self) -> Any:
        return self.stream.state

    def load_state(self, state: Any) -> None:
        self.stream.load_state(state)

    def _with_teacher(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, lp = self.cache.gather(batch["token_index"])
        return {**batch, "teacher_ids": ids, "teacher_logprobs": lp}

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        return self._with_teacher(self.stream.next_batch(batch_size))

    def next_local_batch(self, global_rows: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        return self._with_teacher(local_rows(self.stream, global_rows, rank, world_size))
