"""`stage=cache_teacher`: run a teacher over every token of a dataset once and store its top-K log-probs.

Distillation (LFM2 report, section 4) reads a teacher's top-K distribution at every position. Running the
teacher inside the student's training loop would cost a teacher forward per student step and per epoch;
caching it costs one pass and 128 bytes per token (K = 32, uint16 ids, 2-byte log-probs). The cache format
is `lfm2_train/data/teacher_cache.py`; `data/teacher_cache_writer.py` writes it, block by block and
resumably, with the teachers of `inference/teachers.py`; docs/DISTILLATION.md has the reasoning.

    python -m lfm2_train stage=cache_teacher stage.teacher=<teacher dir> data.path=<dataset> stage.output=<dir>

Ranks take disjoint shards (`shard % world_size == rank`); rank 0 writes `teacher_manifest.json` last, once
every shard's `.done.json` exists, waiting at most `stage.wait_timeout_s` for the others.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..artifacts import checkpoint_sha256
from ..data.format import DataFormatError, ShardReader, check_compatible, load_manifest, verify_shards
from ..data.resolve import resolve_dataset
from ..data.teacher_cache import LOGPROB_DTYPES
from ..data.teacher_cache_writer import (
    JOB_VERSION,
    WORK_DIR,
    cache_is_current,
    compute_block,
    finish_cache,
    start_work_dir,
    wait_for_shards,
    write_shards,
)
from ..engine.barrier import FileBarrier
from ..engine.distributed import Runtime
from ..hints import needs
from ..inference.teachers import (
    COMPUTE_DTYPES,
    LFM2Teacher,
    TransformersTeacher,
    check_teacher_tokenizer,
    check_teacher_vocab,
    compute_autocast,
    teacher_format,
    teacher_geometry,
)
from ..tokenizer import LFM2Tokenizer


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
                  **({"weights_sha256": checkpoint_sha256(teacher_dir)} if stage.hash_teacher_weights
                     else {"path": str(teacher_dir)})}
    job = {"version": JOB_VERSION, "dataset_manifest_hash": manifest.hash(),
           "tokenizer_fingerprint": tokenizer.fingerprint(), "k": k, "vocab_size": vocab, "ids_dtype": ids_dtype,
           "logprob_dtype": stage.logprob_dtype, "teacher": teacher_id, "max_length": int(stage.max_length),
           "window_overlap": opts["overlap"], "compute_dtype": opts["dtype"]}

    out = Path(stage.output) if stage.output else Path(cfg.output_dir) / "teacher_cache"
    work = out / WORK_DIR
    summary: dict[str, Any] = {"output": str(out), "tokens": manifest.num_tokens, "shards": len(manifest.shards)}
    if cache_is_current(out, job, manifest, verify_hashes=cfg.data.verify_hashes, overwrite=stage.overwrite):
        if runtime.is_main:
            print(f"cache_teacher: {out} already holds this cache; nothing to do")
        return {**summary, "status": "complete", "computed_tokens": 0}
    if runtime.is_main:
        start_work_dir(out, job)
    runtime.barrier()  # the others must not read a work directory rank 0 is clearing
    work.mkdir(parents=True, exist_ok=True)

    # -- the teacher
    device = runtime.device
    compute_dtype = COMPUTE_DTYPES[opts["dtype"]]
    cls = LFM2Teacher if fmt == "lfm2" else TransformersTeacher
    teacher = cls(teacher_dir, compute_dtype, device, stage.attn_implementation)
    if teacher.vocab_size != vocab:
        raise DataFormatError(f"teacher {teacher_dir}: head has {teacher.vocab_size} rows, config.json says {vocab}")

    # -- my shards, block by block
    compute = partial(compute_block, teacher, k=k, ids_dtype=ids_dtype, logprob_dtype=stage.logprob_dtype,
                      max_length=stage.max_length, overlap=opts["overlap"], max_tokens=stage.max_tokens_per_batch,
                      autocast=compute_autocast(device, compute_dtype))
    mine = [s for s in range(len(manifest.shards)) if s % runtime.world_size == runtime.rank]
    done = write_shards(out, manifest, ShardReader(dataset_dir, manifest), mine, compute, k=k, ids_dtype=ids_dtype,
                        block_documents=stage.block_documents, stop_after_blocks=stage.stop_after_blocks,
                        progress_bar=stage.progress_bar and runtime.is_main)
    summary.update(computed_tokens=done.rows, seconds=round(time.perf_counter() - started, 3),
                   tokens_per_s=round(done.rows / max(done.seconds, 1e-9), 1))
    if done.interrupted:
        if runtime.is_main:
            print(f"cache_teacher: stopped after {done.blocks} blocks (stage.stop_after_blocks); rerun to resume")
        return {**summary, "status": "interrupted"}
    if not runtime.is_main:
        return {**summary, "status": "finished"}

    # -- rank 0: wait for every shard (a file barrier: ranks may finish hours apart, past any collective
    # timeout), then write the manifest last
    barrier = FileBarrier(stage.wait_timeout_s, label="cache_teacher",
                          hint="Did that rank fail? Finished shards are kept: rerunning the stage resumes (or raise "
                               "stage.wait_timeout_s)")
    shards = wait_for_shards(out, manifest, done.entries, runtime.world_size, barrier.wait)
    teacher_info = {**teacher_id, "path": str(teacher_dir), "num_parameters": teacher.num_parameters}
    summary.update(status="finished", bytes_per_token=finish_cache(out, manifest, job, teacher_info, shards))
    print(f"cache_teacher: {manifest.num_tokens} tokens in {len(shards)} shards -> {out} "
          f"({summary['bytes_per_token']} B/token, {summary['tokens_per_s']} tok/s)")
    return summary
