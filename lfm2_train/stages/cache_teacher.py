"""`stage=cache_teacher`: run a teacher over every token of a dataset once and store its top-K log-probs.

Distillation (LFM2 report, section 4) reads a teacher's top-K distribution at every position. Running the
teacher inside the student's training loop would cost a teacher forward per student step and per epoch;
caching it costs one pass and 128 bytes per token (K = 32, uint16 ids, 2-byte log-probs). The cache format
is `lfm2_train/data/teacher_cache.py`; this stage only produces it.

    python -m lfm2_train stage=cache_teacher stage.teacher=<teacher dir> data.path=<dataset> stage.output=<dir>

Rules (see docs/DISTILLATION.md for the reasoning):
- row i of cache shard s = the teacher's log-softmax (full vocabulary, T = 1, fp32) after token i of token
  shard s, given the document so far; only the top-K ids and their log-probs are kept, sorted descending;
- a document longer than `max_length` is processed in windows: the first covers tokens [0, max_length);
  each next window restarts the context `window_overlap` tokens before the first row it emits, so every
  emitted row sees at least `window_overlap` tokens of its document (0 = non-overlapping restarts);
- windows are packed into rows of at most `max_length` tokens (several documents per row, separated
  with `doc_ids`) and rows into forwards of at most `max_tokens_per_batch` tokens; the LM head runs
  chunk-wise through `head_fn`, so the fp32 (tokens, vocab) logits never exist at once;
- each shard is processed in blocks of `block_documents` documents; after every block its rows are
  appended to `.work/<shard>.{ids,lp}.partial` and an atomic progress file records how many documents and
  tokens are final, so a crash loses at most one block and the resumed output is byte-identical;
- ranks take disjoint shards (`shard % world_size == rank`); rank 0 writes `teacher_manifest.json` last,
  once every shard's `.done.json` exists.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ..data.document_windows import document_windows, group_rows, pack_segments
from ..data.format import (
    DataFormatError,
    ShardReader,
    check_compatible,
    load_manifest,
    sha256_file,
    verify_shards,
    write_json_atomic,
)
from ..data.resolve import resolve_dataset
from ..data.teacher_cache import (
    CACHE_MANIFEST,
    LOGPROB_DTYPES,
    CacheManifest,
    CacheShard,
    TeacherCache,
    cache_shard_name,
    encode_logprobs,
)
from ..engine.distributed import Runtime
from ..hints import needs
from ..inference.teachers import (
    COMPUTE_DTYPES,
    LFM2Teacher,
    Teacher,
    TransformersTeacher,
    check_teacher_tokenizer,
    check_teacher_vocab,
    teacher_format,
    teacher_geometry,
    teacher_weights_sha256,
)
from ..tokenizer import LFM2Tokenizer

JOB_VERSION = 1  # bump when a change to this stage changes the bytes it writes
WORK_DIR = ".work"


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{key}: {a.get(key)!r} != {b.get(key)!r}" for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


# ---------------------------------------------------------------------------------------------- block compute
def compute_block(teacher: Teacher, docs: list[np.ndarray], *, k: int, ids_dtype: str, logprob_dtype: str,
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
    rows = pack_segments(seg_len, max_length, teacher.packs_documents)
    row_len = [sum(seg_len[i] for i in row) for row in rows]
    for batch in group_rows(row_len, max_tokens):
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


# ---------------------------------------------------------------------------------------------- shard files
def _fsync_append(path: Path, data: np.ndarray) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(data).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _write_progress(path: Path, progress: dict[str, int]) -> None:
    """Atomic: the partial files' first `tokens_done` rows are final once this returns."""
    write_json_atomic(path, progress)


def _finished_shard(out: Path, work: Path, name: str, tokens: int) -> CacheShard | None:
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


# ---------------------------------------------------------------------------------------------- the stage
def _options(stage: DictConfig, runtime: Runtime) -> dict[str, Any]:
    if not stage.teacher:
        raise ValueError(needs("cache_teacher", "stage.teacher=<directory of the teacher checkpoint>"))
    if stage.k <= 0:
        raise ValueError(f"stage.k must be positive, got {stage.k}")
    if stage.logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"stage.logprob_dtype={stage.logprob_dtype!r}; choose one of {sorted(LOGPROB_DTYPES)}")
    overlap = stage.max_length // 8 if stage.window_overlap is None else stage.window_overlap
    if stage.max_length <= 0 or not 0 <= overlap < stage.max_length:
        raise ValueError(f"need stage.max_length > 0 and 0 <= stage.window_overlap < max_length, got "
                         f"{stage.max_length} / {overlap}")
    if stage.block_documents <= 0 or stage.max_tokens_per_batch <= 0:
        raise ValueError("stage.block_documents and stage.max_tokens_per_batch must be positive")
    dtype = stage.dtype
    if dtype == "auto":
        dtype = "bfloat16" if runtime.device.type == "cuda" else "float32"
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"stage.dtype={stage.dtype!r}; choose auto or one of {sorted(COMPUTE_DTYPES)}")
    return {"dtype": dtype, "overlap": int(overlap)}


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    runtime = Runtime.from_env(cfg.distributed)
    opts = _options(stage, runtime)
    started = time.perf_counter()

    # -- everything that can refuse the job runs before the teacher's weights are read
    dataset_dir, tokenizer_dir = resolve_dataset(cfg.data, runtime)
    manifest = load_manifest(dataset_dir)
    if cfg.data.verify_hashes:
        verify_shards(dataset_dir, manifest)
    tokenizer = LFM2Tokenizer.from_pretrained(tokenizer_dir)
    check_compatible(manifest, tokenizer_fingerprint=tokenizer.fingerprint(), vocab_size=None,
                     source=str(dataset_dir))
    teacher_dir = Path(stage.teacher).resolve()
    fmt, model_type = teacher_format(teacher_dir, stage.teacher_format)
    check_teacher_tokenizer(teacher_dir, fmt, tokenizer_dir, tokenizer)
    vocab, max_positions = teacher_geometry(teacher_dir, fmt)
    check_teacher_vocab(teacher_dir, vocab, manifest, tokenizer, dataset_dir)
    if max_positions is not None and stage.max_length > max_positions:
        raise ValueError(f"stage.max_length={stage.max_length} exceeds the teacher's max_position_embeddings="
                         f"{max_positions}")
    k = int(stage.k)
    if k > vocab:
        raise ValueError(f"stage.k={k} exceeds the teacher's vocabulary ({vocab})")
    ids_dtype = "uint16" if vocab <= 2**16 else "uint32"
    teacher_id = {"format": fmt, "model_type": model_type,
                  **({"weights_sha256": teacher_weights_sha256(teacher_dir)} if stage.hash_teacher_weights
                     else {"path": str(teacher_dir)})}
    job = {"version": JOB_VERSION, "dataset_manifest_hash": manifest.hash(),
           "tokenizer_fingerprint": tokenizer.fingerprint(), "k": k, "vocab_size": vocab, "ids_dtype": ids_dtype,
           "logprob_dtype": stage.logprob_dtype, "teacher": teacher_id, "max_length": int(stage.max_length),
           "window_overlap": opts["overlap"], "compute_dtype": opts["dtype"]}

    out = Path(stage.output) if stage.output else Path(cfg.output_dir) / "teacher_cache"
    work = out / WORK_DIR
    summary: dict[str, Any] = {"output": str(out), "tokens": manifest.num_tokens, "shards": len(manifest.shards)}
    if (out / CACHE_MANIFEST).is_file():
        old = CacheManifest.from_dict(json.loads((out / CACHE_MANIFEST).read_text()), str(out / CACHE_MANIFEST))
        old_job = old.extra.get("job", {"k": old.k, "dataset_manifest_hash": old.dataset_manifest_hash})
        if old_job == job:
            TeacherCache(out, manifest, k=k, verify_hashes=cfg.data.verify_hashes)  # raises if damaged
            if runtime.is_main:
                print(f"cache_teacher: {out} already holds this cache; nothing to do")
            return {**summary, "status": "complete", "computed_tokens": 0}
        if not stage.overwrite:
            raise DataFormatError(f"{out} holds a complete teacher cache made from another teacher/dataset/K "
                                  f"({'; '.join(_differences(old_job, job))}); set stage.overwrite=true to replace it")
    elif (work / "job.json").is_file():
        old_job = json.loads((work / "job.json").read_text())
        if old_job != job and not stage.overwrite:
            raise DataFormatError(f"{out} holds an unfinished cache of another job "
                                  f"({'; '.join(_differences(old_job, job))}); set stage.overwrite=true to discard it")
    if runtime.is_main:
        stale = (out / CACHE_MANIFEST).is_file() or ((work / "job.json").is_file()
                                                     and json.loads((work / "job.json").read_text()) != job)
        if stale:  # only reachable with stage.overwrite=true
            (out / CACHE_MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            for f in out.glob("topk-*"):
                f.unlink()
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(work / "job.json", job)
    runtime.barrier()  # the others must not read a work directory rank 0 is clearing
    work.mkdir(parents=True, exist_ok=True)

    # -- the teacher
    device = runtime.device
    compute_dtype = COMPUTE_DTYPES[opts["dtype"]]
    cls = LFM2Teacher if fmt == "lfm2" else TransformersTeacher
    teacher = cls(teacher_dir, compute_dtype, device, stage.attn_implementation)
    if teacher.vocab_size != vocab:
        raise DataFormatError(f"teacher {teacher_dir}: head has {teacher.vocab_size} rows, config.json says {vocab}")

    def autocast() -> AbstractContextManager:
        if compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=compute_dtype)

    # -- my shards, block by block
    reader = ShardReader(dataset_dir, manifest)
    first_doc = np.concatenate([[0], np.cumsum([s.documents for s in manifest.shards])]).astype(np.int64)
    mine = [s for s in range(len(manifest.shards)) if s % runtime.world_size == runtime.rank]
    names = [cache_shard_name(s.name) for s in manifest.shards]
    ids_row, lp_row = k * np.dtype(ids_dtype).itemsize, k * 2
    entries = {s: _finished_shard(out, work, names[s], manifest.shards[s].tokens) for s in mine}
    todo = [s for s in mine if entries[s] is None]
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(manifest.shards[s].tokens for s in todo), unit="tok", unit_scale=True,
               desc="cache_teacher", disable=not (stage.progress_bar and runtime.is_main), dynamic_ncols=True)
    blocks, computed, interrupted = 0, 0, False
    compute_start = time.perf_counter()
    for s in todo:
        name, info = names[s], manifest.shards[s]
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
        for lo in range(progress["documents"], info.documents, stage.block_documents):
            hi = min(lo + stage.block_documents, info.documents)
            docs = [np.asarray(reader.document(int(first_doc[s] + j))) for j in range(lo, hi)]
            ids, words = compute_block(teacher, docs, k=k, ids_dtype=ids_dtype, logprob_dtype=stage.logprob_dtype,
                                       max_length=stage.max_length, overlap=opts["overlap"],
                                       max_tokens=stage.max_tokens_per_batch, autocast=autocast)
            _fsync_append(partial[".ids"], ids)
            _fsync_append(partial[".lp"], words)
            progress = {"documents": hi, "tokens": progress["tokens"] + len(ids)}
            _write_progress(progress_file, progress)
            bar.update(len(ids))
            computed += len(ids)
            blocks += 1
            if stage.stop_after_blocks is not None and blocks >= stage.stop_after_blocks:
                interrupted = True
                break
        if interrupted:
            break
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
        entries[s] = entry
    bar.close()
    seconds = time.perf_counter() - compute_start
    summary.update(computed_tokens=computed, seconds=round(time.perf_counter() - started, 3),
                   tokens_per_s=round(computed / max(seconds, 1e-9), 1))
    if interrupted:
        if runtime.is_main:
            print(f"cache_teacher: stopped after {blocks} blocks (stage.stop_after_blocks); rerun to resume")
        return {**summary, "status": "interrupted"}
    if not runtime.is_main:
        return {**summary, "status": "finished"}

    # -- rank 0: wait for every shard (a file barrier: ranks may finish hours apart, past any collective
    # timeout), then write the manifest last
    shards: list[CacheShard] = []
    for s, info in enumerate(manifest.shards):
        entry = entries.get(s)
        while entry is None and (entry := _finished_shard(out, work, names[s], info.tokens)) is None:
            print(f"cache_teacher: waiting for rank {s % runtime.world_size} to finish {names[s]}")
            time.sleep(10)
        shards.append(entry)
    teacher_info = {**teacher_id, "path": str(teacher_dir), "num_parameters": teacher.num_parameters}
    CacheManifest(k=k, vocab_size=vocab, ids_dtype=ids_dtype, logprob_dtype=stage.logprob_dtype,
                  dataset_manifest_hash=manifest.hash(), tokenizer_fingerprint=tokenizer.fingerprint(),
                  teacher=teacher_info, shards=shards,
                  extra={"job": job, "max_length": job["max_length"], "window_overlap": job["window_overlap"],
                         "compute_dtype": opts["dtype"]}).save(out)
    shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    summary.update(status="finished", bytes_per_token=round(size / max(manifest.num_tokens, 1), 2))
    print(f"cache_teacher: {manifest.num_tokens} tokens in {len(shards)} shards -> {out} "
          f"({summary['bytes_per_token']} B/token, {summary['tokens_per_s']} tok/s)")
    return summary
