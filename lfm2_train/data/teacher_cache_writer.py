"""Writing a teacher cache (the format and its reader: `data/teacher_cache.py`), resumably.

- row i of cache shard s = the teacher's log-softmax (full vocabulary, T = 1, fp32) after token i of token
  shard s, given the document so far; only the top-K ids and their log-probs are kept, sorted descending;
- long documents are read in overlapping windows, packed into rows and batches (`data/document_windows.py`);
- each shard is processed in blocks of `block_documents` documents; after every block its rows are
  appended to `.work/<shard>.{ids,lp}.partial` and an atomic progress file records how many documents and
  tokens are final, so a crash loses at most one block and the resumed output is byte-identical;
- a finished shard's files are renamed into place and recorded in `.work/<shard>.done.json` (with their
  sha256); the manifest is written last, once every shard is done, and the work directory removed;
- `.work/job.json` names the job (teacher, dataset, K, dtypes, windows): another job's cache, finished or
  not, is never resumed or overwritten silently.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..artifacts import describe_differences
from .document_windows import document_windows
from .format import DataFormatError, Manifest, ShardInfo, ShardReader, sha256_file, write_json_atomic
from .packing import batches_longest_first, decreasing_order, first_fit_decreasing
from .teacher_cache import CACHE_MANIFEST, CacheManifest, CacheShard, TeacherCache, cache_shard_name, encode_logprobs

JOB_VERSION = 1  # bump when a change to the writer or the teacher pass changes the bytes written
WORK_DIR = ".work"


class TopKTeacher(Protocol):
    """What the writer needs of a teacher (`inference/teachers.py` has the two adapters)."""

    packs_documents: bool  # several documents per row (with doc_ids), or one window per row

    def topk(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, emit: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor]: ...


def compute_block(teacher: TopKTeacher, docs: list[np.ndarray], *, k: int, ids_dtype: str, logprob_dtype: str,
                  max_length: int, overlap: int, max_tokens: int, autocast: Callable[[], AbstractContextManager]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Top-K ids (n, K) and log-prob words (n, K) for the n tokens of consecutive documents `docs`."""
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    n = int(offsets[-1])
    out_ids = np.empty((n, k), dtype=ids_dtype)
    out_lp = torch.empty((n, k), dtype=torch.float32)
    covered = np.zeros(n, dtype=bool)
    segments = []  # (doc, context start, emit start, end)
    for j, doc in enumerate(docs):
        segments += [(j, *w) for w in document_windows(len(doc), max_length, overlap)]
    seg_len = [end - start for _, start, _, end in segments]
    # Deterministic in the segment lengths, which is what makes a resumed block compute the same batches.
    if teacher.packs_documents:
        rows = first_fit_decreasing(seg_len, max_length)
    else:
        rows = [[i] for i in decreasing_order(seg_len)]
    row_len = [sum(seg_len[i] for i in row) for row in rows]
    for batch in batches_longest_first(row_len, max_tokens):
        T = max(row_len[r] for r in batch)
        input_ids = torch.zeros((len(batch), T), dtype=torch.long)
        doc_ids = torch.full((len(batch), T), -1, dtype=torch.long)
        emit = torch.zeros((len(batch), T), dtype=torch.bool)
        dest = torch.zeros((len(batch), T), dtype=torch.long)
        for b, r in enumerate(batch):
            pos = 0
            for s_i, i in enumerate(rows[r]):
                j, start, first, end = segments[i]
                length = end - start
                input_ids[b, pos:pos + length] = torch.from_numpy(docs[j][start:end].astype(np.int64))
                doc_ids[b, pos:pos + length] = s_i
                emit[b, pos + first - start:pos + length] = True
                dest[b, pos:pos + length] = torch.arange(offsets[j] + start, offsets[j] + end)
                pos += length
        with torch.inference_mode(), autocast():
            ids, lp = teacher.topk(input_ids, doc_ids, emit, k)
        where = dest[emit].numpy()
        out_ids[where] = ids.numpy().astype(ids_dtype)
        out_lp[torch.from_numpy(where)] = lp
        covered[where] = True
    if not covered.all():  # a bug in the window or packing rules, never a data problem
        raise AssertionError(f"block rows {np.flatnonzero(~covered)[:8].tolist()} were not computed")
    return out_ids, encode_logprobs(out_lp, logprob_dtype)


def _fsync_append(path: Path, data: np.ndarray) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(data).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _write_progress(path: Path, progress: dict[str, int]) -> None:
    """Atomic: the partial files' first `tokens_done` rows are final once this returns."""
    write_json_atomic(path, progress)


def finished_shard(out: Path, work: Path, name: str, tokens: int) -> CacheShard | None:
    """A shard completed by an earlier run, if its files still hash to what was recorded."""
    done = work / f"{name}.done.json"
    if not done.is_file():
        return None
    entry = CacheShard(**json.loads(done.read_text()))
    ok = entry.tokens == tokens and all(
        (out / f"{name}{suffix}").is_file() and sha256_file(out / f"{name}{suffix}") == digest
        for suffix, digest in ((".ids", entry.ids_sha256), (".lp", entry.lp_sha256)))
    if not ok:
        print(f"cache_teacher: {name} no longer matches its recorded sha256; recomputing it")
        done.unlink()
        return None
    return entry


def cache_is_current(out: Path, job: dict[str, Any], manifest: Manifest, *, verify_hashes: bool,
                     overwrite: bool) -> bool:
    """True when `out` already holds this job's complete cache (checked against the dataset: it raises if
    damaged). Another job's cache there, complete or not, is refused unless `overwrite`."""
    work = out / WORK_DIR
    if (out / CACHE_MANIFEST).is_file():
        old = CacheManifest.from_dict(json.loads((out / CACHE_MANIFEST).read_text()), str(out / CACHE_MANIFEST))
        old_job = old.extra.get("job", {"k": old.k, "dataset_manifest_hash": old.dataset_manifest_hash})
        if old_job == job:
            TeacherCache(out, manifest, k=job["k"], verify_hashes=verify_hashes)  # raises if damaged
            return True
        if not overwrite:
            raise DataFormatError(f"{out} holds a complete teacher cache made from another teacher/dataset/K "
                                  f"({describe_differences(old_job, job)}); set stage.overwrite=true to "
                                  "replace it")
    elif (work / "job.json").is_file():
        old_job = json.loads((work / "job.json").read_text())
        if old_job != job and not overwrite:
            raise DataFormatError(f"{out} holds an unfinished cache of another job "
                                  f"({describe_differences(old_job, job)}); set stage.overwrite=true to "
                                  "discard it")
    return False


def start_work_dir(out: Path, job: dict[str, Any]) -> None:
    """Rank 0, before any shard: remove another job's cache (`cache_is_current` let it through only with
    overwrite) and record this job in the work directory."""
    work = out / WORK_DIR
    stale = (out / CACHE_MANIFEST).is_file() or ((work / "job.json").is_file()
                                                 and json.loads((work / "job.json").read_text()) != job)
    if stale:
        (out / CACHE_MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        for f in out.glob("topk-*"):
            f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "job.json", job)


def write_shard(out: Path, name: str, info: ShardInfo, reader: ShardReader, first_doc: int,
                compute: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]], *, k: int, ids_dtype: str,
                block_documents: int, bar: Any, block_done: Callable[[int], bool]) -> CacheShard | None:
    """Compute the cache shard `name` for token shard `info` (its documents start at `first_doc`), block by
    block, resuming from what an earlier run recorded. `block_done(rows)` is called after every block; when it
    returns True the shard stops there, unfinished (None), to be resumed by the next run."""
    work = out / WORK_DIR
    ids_row, lp_row = k * np.dtype(ids_dtype).itemsize, k * 2
    progress_file = work / f"{name}.progress.json"
    partial = {".ids": work / f"{name}.ids.partial", ".lp": work / f"{name}.lp.partial"}
    progress = json.loads(progress_file.read_text()) if progress_file.is_file() else None
    sizes = {suf: p.stat().st_size if p.is_file() else 0 for suf, p in partial.items()}
    if progress is None or sizes[".ids"] < progress["tokens"] * ids_row \
            or sizes[".lp"] < progress["tokens"] * lp_row:
        progress = {"documents": 0, "tokens": 0}  # nothing usable: start the shard over
    for suffix, path in partial.items():  # drop rows of a block whose progress was never recorded
        with open(path, "ab") as f:
            f.truncate(progress["tokens"] * (ids_row if suffix == ".ids" else lp_row))
    bar.update(progress["tokens"])
    bar.set_postfix_str(name)
    for lo in range(progress["documents"], info.documents, block_documents):
        hi = min(lo + block_documents, info.documents)
        docs = [np.asarray(reader.document(int(first_doc + j))) for j in range(lo, hi)]
        ids, words = compute(docs)
        _fsync_append(partial[".ids"], ids)
        _fsync_append(partial[".lp"], words)
        progress = {"documents": hi, "tokens": progress["tokens"] + len(ids)}
        _write_progress(progress_file, progress)
        bar.update(len(ids))
        if block_done(len(ids)):
            return None
    if progress["tokens"] != info.tokens:
        raise DataFormatError(f"{name}: computed {progress['tokens']} rows for {info.tokens} tokens")
    # The partial files hold exactly the bytes `write_cache_shard` writes; renaming them avoids reading
    # a multi-GB shard back into memory.
    for suffix, path in partial.items():
        os.replace(path, out / f"{name}{suffix}")
    entry = CacheShard(name=name, tokens=info.tokens, ids_sha256=sha256_file(out / f"{name}.ids"),
                       lp_sha256=sha256_file(out / f"{name}.lp"))
    write_json_atomic(work / f"{name}.done.json", asdict(entry))
    progress_file.unlink()
    return entry


@dataclass
class PassResult:
    """What one rank's pass over its shards did."""

    entries: dict[int, CacheShard | None] = field(default_factory=dict)  # shard index -> its entry (None: unfinished)
    blocks: int = 0
    rows: int = 0
    seconds: float = 0.0  # computing (finished shards found on disk are not counted)
    interrupted: bool = False


def write_shards(out: Path, manifest: Manifest, reader: ShardReader, mine: list[int],
                 compute: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]], *, k: int, ids_dtype: str,
                 block_documents: int, stop_after_blocks: int | None = None, progress_bar: bool = False) -> PassResult:
    """Write the cache shards `mine` (indices into the dataset's shards), skipping those an earlier run finished;
    `stop_after_blocks` stops the pass as if it were interrupted (debug)."""
    work = out / WORK_DIR
    first_doc = np.concatenate([[0], np.cumsum([s.documents for s in manifest.shards])]).astype(np.int64)
    names = [cache_shard_name(s.name) for s in manifest.shards]
    result = PassResult({s: finished_shard(out, work, names[s], manifest.shards[s].tokens) for s in mine})
    todo = [s for s in mine if result.entries[s] is None]
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(manifest.shards[s].tokens for s in todo), unit="tok", unit_scale=True,
               desc="cache_teacher", disable=not progress_bar, dynamic_ncols=True)

    def block_done(rows: int) -> bool:
        result.blocks += 1
        result.rows += rows
        return stop_after_blocks is not None and result.blocks >= stop_after_blocks

    compute_start = time.perf_counter()
    for s in todo:
        result.entries[s] = write_shard(out, names[s], manifest.shards[s], reader, int(first_doc[s]), compute, k=k,
                                        ids_dtype=ids_dtype, block_documents=block_documents, bar=bar,
                                        block_done=block_done)
        if result.entries[s] is None:
            result.interrupted = True
            break
    bar.close()
    result.seconds = time.perf_counter() - compute_start
    return result


def wait_for_shards(out: Path, manifest: Manifest, entries: dict[int, CacheShard | None], world_size: int,
                    wait: Callable[..., CacheShard]) -> list[CacheShard]:
    """Every shard's entry, in order: this rank's from `entries`, the others' once their `.done.json` appears.
    `wait(ready, path, rank=, what=)` is a file barrier's wait (`engine/barrier.py`), bounded in time."""
    work = out / WORK_DIR
    shards: list[CacheShard] = []
    for s, info in enumerate(manifest.shards):
        entry = entries.get(s)
        if entry is None:
            name = cache_shard_name(info.name)
            entry = wait(lambda name=name, tokens=info.tokens: finished_shard(out, work, name, tokens),
                         work / f"{name}.done.json", rank=s % world_size, what=name)
        shards.append(entry)
    return shards


def finish_cache(out: Path, manifest: Manifest, job: dict[str, Any], teacher: dict[str, Any],
                 shards: list[CacheShard]) -> float:
    """Write the cache manifest (last: it is what makes the cache complete), remove the work directory and
    return the cache's bytes per dataset token."""
    CacheManifest(k=job["k"], vocab_size=job["vocab_size"], ids_dtype=job["ids_dtype"],
                  logprob_dtype=job["logprob_dtype"], dataset_manifest_hash=manifest.hash(),
                  tokenizer_fingerprint=job["tokenizer_fingerprint"], teacher=teacher, shards=shards,
                  extra={"job": job, "max_length": job["max_length"], "window_overlap": job["window_overlap"],
                         "compute_dtype": job["compute_dtype"]}).save(out)
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return round(size / max(manifest.num_tokens, 1), 2)
