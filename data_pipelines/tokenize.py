"""Tokenize text sources into token shards: ``python -m data_pipelines.tokenize [overrides]``.

Reads local json / jsonl / parquet / text files (or hub datasets) with `datasets`, mixes the sources by
weight or token budget, applies fill-in-the-middle to code sources, and writes the shard format of
``lfm2_train/data/format.py``: ``shard-NNNNN.bin/.idx`` files, then ``manifest.json`` last. See
``docs/DATA.md`` for the mixture rule, the FIM layout and the resume behaviour.

Design points:

- Determinism. A document's tokens depend only on the document and its identity (source, epoch, row);
  which document comes next depends only on token counts so far. Hence the output is the same for any
  ``num_workers``/``batch_size``, and a resumed job writes the same bytes as an uninterrupted one.
- Resumability. After each shard the job writes ``tokenize_state.json`` (atomically): the shards so far,
  each with the per-source read position after it. A restart with the same config verifies those shards,
  deletes anything else that looks like ours (a half-written shard), and continues from the last good one.
- Safety. Every source, the tokenizer and the id dtype are checked before the first shard is written;
  a directory holding a finished dataset of another config is refused unless ``overwrite=true``; without
  ``manifest.json`` a directory is never mistaken for a dataset.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lfm2_train.artifacts import sha256_json
from lfm2_train.data.format import (
    MANIFEST,
    DataFormatError,
    Manifest,
    ShardInfo,
    load_manifest,
    remove_own_files,
    sha256_file,
    token_dtype,
    verify_shards,
    wipe_dataset,
    write_json_atomic,
    write_shard,
)
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

from ._job import DataJob, without
from .corpus import default_mixture
from .fim import (
    FIM_MID,
    FIM_PRE,
    FIM_SUF,
    PSM,
    PSM_LAYOUT,
    SEPARATOR,
    SKIPPED,
    SPM,
    SPM_LAYOUT,
    DocumentEncoder,
    EncodedBatch,
    EncoderSpec,
    encode_in_worker,
    init_worker,
)
from .sources import LoadedSource, SourceConfig, SourceError, load_source

log = logging.getLogger(__name__)

STATE_FILE = "tokenize_state.json"
STATE_VERSION = 1
# Fields that change how the job runs but not what it writes: excluded from the dataset's identity and
# from the manifest, so that e.g. 1 and 2 workers produce byte-identical directories.
RUNTIME_FIELDS = ("output_dir", "num_workers", "batch_size", "overwrite", "progress", "cache_dir",
                  "stop_after_shards", "copy_tokenizer")
TOKENIZER_DIR = "tokenizer"
# Files this job writes (shards, write_shard / write_json_atomic temporaries): the only ones it ever deletes.
_OURS = re.compile(r"^(shard-\d{5}\.(bin|idx)|\.shard-\d{5}\.(bin|idx)\.tmp"
                   r"|\.(manifest|tokenize_state)\.json\.tmp-\d+)$")


@dataclass
class FIMConfig:
    rate: float = 0.5  # share of documents of `code: true` sources that are FIM'd
    spm_rate: float = 0.5  # share of FIM'd documents in SPM (the rest PSM)


@dataclass
class TokenizeConfig:
    """`python -m data_pipelines.tokenize`: sources → token shards + manifest."""

    sources: list[SourceConfig] = field(default_factory=default_mixture)  # default: the bundled corpus
    tokenizer: str | None = None  # HF tokenizer directory or tokenizer.json; None = bundled tiny tokenizer
    output_dir: str = "outputs/shards"  # fixed by default so that rerunning the same command resumes
    total_tokens: int | None = None  # tokens for the weighted sources together; None = see docs/DATA.md
    shard_tokens: int = 16_777_216  # a shard closes before a document would take it past this
    fim: FIMConfig = field(default_factory=FIMConfig)
    seed: int = 0  # FIM draws
    dtype: str | None = None  # uint16 | uint32; None = uint16 when the vocab fits
    parse_special_tokens: bool = False  # True: special-token strings in the text become special ids
    num_workers: int = 1  # tokenizer processes; 1 = in-process (the tokenizer still uses Rust threads)
    batch_size: int = 512  # documents per task
    overwrite: bool = False  # replace a dataset / an unfinished job made with another config
    progress: bool = True
    cache_dir: str | None = None  # `datasets` cache; None = its default (~/.cache/huggingface/datasets)
    stop_after_shards: int | None = None  # debug: stop (as if killed) after writing this many shards
    copy_tokenizer: bool = True  # save the tokenizer to <output_dir>/tokenizer (where the trainer looks)


class TokenizeError(ValueError):
    """The job's configuration or output directory cannot be used as given."""


# ---------------------------------------------------------------------------------------------- config
def as_config(cfg: TokenizeConfig | DictConfig | dict[str, Any]) -> TokenizeConfig:
    """A typed TokenizeConfig from a dataclass, a Hydra DictConfig or a plain dict (validated by OmegaConf)."""
    if isinstance(cfg, TokenizeConfig):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(TokenizeConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _config_dict(cfg: TokenizeConfig) -> dict[str, Any]:
    data = asdict(cfg)
    for key in RUNTIME_FIELDS:
        data.pop(key)
    return data


def _check_options(cfg: TokenizeConfig) -> None:
    if not cfg.sources:
        raise TokenizeError("no sources configured")
    names = [s.name for s in cfg.sources]
    if len(set(names)) != len(names):
        raise TokenizeError(f"source names must be unique (they seed the FIM draws): {names}")
    if cfg.shard_tokens <= 0:
        raise TokenizeError(f"shard_tokens must be positive, got {cfg.shard_tokens}")
    if not (0.0 <= cfg.fim.rate <= 1.0 and 0.0 <= cfg.fim.spm_rate <= 1.0):
        raise TokenizeError(f"fim.rate and fim.spm_rate must lie in [0, 1], got {cfg.fim.rate}, {cfg.fim.spm_rate}")
    if cfg.num_workers < 1 or cfg.batch_size < 1:
        raise TokenizeError("num_workers and batch_size must be >= 1")
    for s in cfg.sources:
        if (s.weight is None) == (s.token_budget is None):
            raise SourceError(f"source {s.name!r}: give exactly one of weight and token_budget")
        if s.weight is not None and not s.weight > 0:
            raise SourceError(f"source {s.name!r}: weight must be positive, got {s.weight}")
        if s.token_budget is not None and s.token_budget <= 0:
            raise SourceError(f"source {s.name!r}: token_budget must be positive, got {s.token_budget}")


def _resolve_dtype(requested: str | None, vocab_size: int, tokenizer: str) -> np.dtype:
    if requested is None:
        return token_dtype(vocab_size)
    if requested not in ("uint16", "uint32"):
        raise TokenizeError(f"dtype must be uint16 or uint32 (the shard format), got {requested!r}")
    dtype = np.dtype(requested)
    if vocab_size - 1 > np.iinfo(dtype).max:
        raise TokenizeError(f"tokenizer {tokenizer} has {vocab_size} tokens: ids up to {vocab_size - 1} do not "
                            f"fit dtype {requested} (max {np.iinfo(dtype).max}); use uint32 or leave dtype unset")
    return dtype


# ---------------------------------------------------------------------------------------------- mixture
@dataclass
class SourcePlan:
    """How many tokens one source contributes, and its share for interleaving."""

    share: float  # interleaving weight: the next document comes from the min of tokens / share
    target: int | None  # tokens; None = anchor (read once) or follower (known when the anchor is done)
    anchor: bool = False
    follow: float | None = None  # follower: target = follow * anchor tokens


def plan_mixture(cfg: TokenizeConfig) -> list[SourcePlan]:
    """Token targets per source (the rule is documented in docs/DATA.md, "Mixtures").

    - ``token_budget``: that many tokens.
    - weights with ``total_tokens``: the weighted sources share ``total_tokens - sum(budgets)`` by weight.
    - weights without ``total_tokens``: the largest-weight source (first on a tie) is read exactly once,
      every other weighted source gets ``weight / max weight`` times the tokens it produced. Budgets are
      not allowed alongside, since their size relative to the weighted part would be unknown up front.
    A source smaller than its target is repeated (epoch 2, 3, … with fresh FIM draws).
    """
    budget = {s.name: s.token_budget for s in cfg.sources if s.token_budget is not None}
    weight = {s.name: float(s.weight) for s in cfg.sources if s.weight is not None}
    if cfg.total_tokens is not None:
        if not weight:
            raise TokenizeError("total_tokens is set but every source has a token_budget; drop one or the other")
        rest = cfg.total_tokens - sum(budget.values())
        if rest <= 0:
            raise TokenizeError(f"total_tokens={cfg.total_tokens} leaves nothing for the weighted sources after "
                                f"the token budgets ({sum(budget.values())})")
        total_w = sum(weight.values())
        targets = [budget[s.name] if s.name in budget else round(rest * weight[s.name] / total_w)
                   for s in cfg.sources]
        return [SourcePlan(share=max(t, 1), target=t) for t in targets]
    if not weight:
        return [SourcePlan(share=budget[s.name], target=budget[s.name]) for s in cfg.sources]
    if budget:
        raise TokenizeError(f"sources {sorted(budget)} have token budgets and others weights: set total_tokens so "
                            f"the weights have a total, or give every source a token_budget")
    w_max = max(weight.values())
    anchor = next(s.name for s in cfg.sources if weight[s.name] == w_max)
    return [SourcePlan(share=weight[s.name], target=None, anchor=s.name == anchor,
                       follow=None if s.name == anchor else weight[s.name] / w_max) for s in cfg.sources]


@dataclass
class Cursor:
    """Per-source progress; checkpointed with every shard."""

    consumed: int = 0  # rows read, all epochs (row = consumed % rows, epoch = consumed // rows)
    documents: int = 0
    tokens: int = 0
    skipped: int = 0  # empty or null rows
    psm: int = 0
    spm: int = 0


class Mixer:
    """Chooses the source of the next document: weighted fair queueing over token counts."""

    def __init__(self, plans: list[SourcePlan], rows: list[int], cursors: list[Cursor]) -> None:
        self.plans, self.rows, self.cursors = plans, rows, cursors
        self.anchor = next((i for i, p in enumerate(plans) if p.anchor), None)

    def anchor_done(self) -> bool:
        return self.anchor is None or self.cursors[self.anchor].consumed >= self.rows[self.anchor]

    def target(self, i: int) -> int | None:
        """Final token target of source i, or None while it is not known yet."""
        p = self.plans[i]
        if p.target is not None:
            return p.target
        if p.anchor or not self.anchor_done():
            return None
        return int(np.ceil(p.follow * self.cursors[self.anchor].tokens))  # type: ignore[index,operator]

    def active(self, i: int) -> bool:
        if self.plans[i].anchor:
            return not self.anchor_done()
        target = self.target(i)
        return target is None or self.cursors[i].tokens < target

    def pick(self) -> int | None:
        """Index of the active source furthest behind its share (lowest index on ties), None when done."""
        best, best_key = None, 0.0
        for i, p in enumerate(self.plans):
            if self.active(i):
                key = self.cursors[i].tokens / p.share
                if best is None or key < best_key:
                    best, best_key = i, key
        return best


# ---------------------------------------------------------------------------------------------- streams
class SourceStream:
    """Encoded documents of one source in stream order, with a bounded number of batches in flight."""

    def __init__(self, source: LoadedSource, start: int, batch_size: int, submit: Any, depth: int,
                 once: bool) -> None:
        self.source, self.batch_size, self.submit, self.depth = source, batch_size, submit, depth
        self.limit = source.num_rows if once else None  # the anchor is never read past one epoch
        self.next_submit = start
        self.pending: deque[Any] = deque()
        self.tokens = np.zeros(0)
        self.offsets: list[int] = []
        self.modes: list[int] = []
        self.pos = 0

    def _fill(self) -> None:
        rows = self.source.num_rows
        while len(self.pending) < self.depth and (self.limit is None or self.next_submit < self.limit):
            epoch, row = divmod(self.next_submit, rows)
            stop = min(row + self.batch_size, rows)  # batches never cross an epoch boundary
            texts = self.source.texts(row, stop)
            cfg = self.source.config
            self.pending.append(self.submit(texts, cfg.name, cfg.code, epoch, row))
            self.next_submit += stop - row

    def next(self) -> tuple[np.ndarray, int]:
        """Tokens (a view) and mode of the next row; SKIPPED rows come back with zero tokens."""
        if self.pos >= len(self.modes):
            self._fill()
            result = self.pending.popleft()
            batch: EncodedBatch = result.get() if hasattr(result, "get") else result
            self.tokens, self.offsets, self.modes = batch.tokens, batch.offsets.tolist(), batch.modes.tolist()
            self.pos = 0
            self._fill()
        j = self.pos
        self.pos += 1
        return self.tokens[self.offsets[j]:self.offsets[j + 1]], self.modes[j]


class Executor:
    """Runs encode tasks in-process (num_workers=1) or in a spawn pool (identical results either way)."""

    def __init__(self, spec: EncoderSpec, num_workers: int) -> None:
        self.pool = None
        if num_workers == 1:
            self.encoder = DocumentEncoder(spec)
        else:
            # spawn, not fork: the parent holds Arrow and Rust thread pools that must not be forked.
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(num_workers, initializer=init_worker,
                                 initargs=(EncoderSpec(**{**asdict(spec), "single_thread": True}),))
        self.depth = 1 if self.pool is None else 2 * num_workers

    def submit(self, *args: Any) -> Any:
        if self.pool is None:
            return self.encoder.encode(*args)
        return self.pool.apply_async(encode_in_worker, args)

    def close(self, ok: bool) -> None:
        if self.pool is not None:
            if ok:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()


# ----------------------------------------------------------------------------------------- output dir
def _identity(cfg: TokenizeConfig, fingerprint: str, dtype: np.dtype, sources: list[LoadedSource]) -> dict:
    """What determines the output: config (less runtime fields and the tokenizer path), vocab, input files."""
    config = _config_dict(cfg)
    config.pop("tokenizer")
    inputs = [{"source": s.config.name, "files": [[f["path"], f["bytes"]] for f in s.file_info], "rows": s.num_rows}
              for s in sources]
    return {"config": config, "tokenizer_fingerprint": fingerprint, "dtype": dtype.name, "inputs": inputs}


def _job_hash(identity: dict[str, Any]) -> str:
    """Identity of an unfinished job: everything but the input files (whose change restarts it)."""
    return sha256_json({k: v for k, v in identity.items() if k != "inputs"})


def _shard_ok(out: Path, info: ShardInfo) -> bool:
    files = ((out / f"{info.name}.bin", info.sha256), (out / f"{info.name}.idx", info.idx_sha256))
    return all(p.is_file() and sha256_file(p) == digest for p, digest in files)


def prepare_output(out: Path, cfg: TokenizeConfig, identity: dict[str, Any],
                   inputs: list[Any]) -> dict[str, Any] | None:
    """Decide between refuse / already done / resume / fresh start; returns the state to resume from.

    Returns ``{"complete": Manifest}`` for a finished dataset of this config, a state dict to resume from,
    or None for a fresh start (after clearing leftovers of ours). A finished dataset is identified by the
    full identity (config, tokenizer, input files and sizes); an unfinished job by the identity without the
    inputs, so that changed inputs (``inputs``: paths, sizes, mtimes) restart it instead of refusing.
    """
    identity_hash = sha256_json(identity)
    job_hash = _job_hash(identity)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        wipe_dataset(out, _OURS, STATE_FILE)
        return None
    if (out / MANIFEST).is_file():
        try:
            manifest = load_manifest(out)
        except DataFormatError as err:
            raise TokenizeError(f"{out} holds an unreadable dataset ({err}); set overwrite=true to replace it") \
                from None
        if manifest.extra.get("config_hash") != identity_hash:
            raise TokenizeError(f"{out} holds a finished dataset made with a different config or inputs "
                                f"(config_hash {str(manifest.extra.get('config_hash'))[:12]}…, this run "
                                f"{identity_hash[:12]}…); choose another output_dir or set overwrite=true")
        try:
            verify_shards(out, manifest)
        except DataFormatError as err:
            raise TokenizeError(f"{out} holds this dataset but {err}; set overwrite=true to rebuild it") from None
        return {"complete": manifest}
    state_path = out / STATE_FILE
    if not state_path.is_file():
        remove_own_files(out, _OURS)  # a job killed before its first shard
        return None
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError:
        raise TokenizeError(f"{state_path} is corrupt; set overwrite=true to start over") from None
    if state.get("version") != STATE_VERSION or state.get("job_hash") != job_hash:
        raise TokenizeError(f"{out} holds an unfinished job with a different config or tokenizer; choose another "
                            f"output_dir or set overwrite=true to discard it")
    if state.get("inputs") != inputs:
        log.warning("input files were modified since the interrupted run; starting over")
        wipe_dataset(out, _OURS, STATE_FILE)
        return None
    kept = []
    for entry in state["shards"]:
        info = ShardInfo(**entry["info"])
        if not _shard_ok(out, info):
            log.warning("%s does not match its checkpoint; redoing it and everything after it", info.name)
            break
        kept.append(entry)
    state["shards"] = kept
    own = {f"{e['info']['name']}{x}" for e in kept for x in (".bin", ".idx")}
    removed = remove_own_files(out, _OURS, keep=own)
    if removed:
        log.info("discarded partial files: %s", ", ".join(removed))
    return state


# ---------------------------------------------------------------------------------------------- the job
def _load_tokenizer(path: str | None) -> tuple[LFM2Tokenizer, Path]:
    tok_path = Path(path).expanduser() if path else tiny_tokenizer_path()
    try:
        return LFM2Tokenizer.from_pretrained(tok_path), tok_path
    except (FileNotFoundError, ValueError) as err:
        raise TokenizeError(f"tokenizer {tok_path}: {err}") from None


def _needs_tokenizer_copy(directory: Path, fingerprint: str, overwrite: bool) -> bool:
    """True unless ``directory`` already holds this tokenizer; another tokenizer there is refused (or replaced
    with overwrite=true), since the trainer would pick it up as the dataset's tokenizer."""
    if not (directory / "tokenizer.json").is_file():
        return True
    try:
        existing = LFM2Tokenizer.from_pretrained(directory, required_special_tokens=None).fingerprint()
    except (OSError, ValueError):
        existing = None
    if existing == fingerprint:
        return False
    if not overwrite:
        raise TokenizeError(f"{directory} holds a different tokenizer than the one this job uses; point "
                            f"tokenizer= at it, or set overwrite=true (or copy_tokenizer=false)")
    return True


def _encoder_spec(cfg: TokenizeConfig, tok: LFM2Tokenizer, dtype: np.dtype) -> EncoderSpec:
    fim_on = cfg.fim.rate > 0 and any(s.code for s in cfg.sources)
    fim_ids = None
    if fim_on:
        ids = [tok.token_to_id(t) for t in (FIM_PRE, FIM_MID, FIM_SUF)]
        if None in ids:
            raise TokenizeError(f"FIM is on (fim.rate={cfg.fim.rate}) but the tokenizer lacks {FIM_PRE}/{FIM_MID}/"
                                f"{FIM_SUF}; set fim.rate=0 or use an LFM2 tokenizer")
        fim_ids = tuple(ids)
    sep = tok.token_to_id(SEPARATOR)
    if sep is None:
        raise TokenizeError(f"the tokenizer has no document separator {SEPARATOR}")
    return EncoderSpec(tokenizer_json=tok.backend.to_str(), dtype=dtype.name, separator_id=sep,
                       fim_ids=fim_ids, fim_rate=cfg.fim.rate if fim_on else 0.0, spm_rate=cfg.fim.spm_rate,
                       seed=cfg.seed, parse_special_tokens=cfg.parse_special_tokens)


class _Progress:
    """tqdm bar in tokens (rate = tokens/s) with documents/s in the postfix; silent when disabled."""

    def __init__(self, enabled: bool, total: int | None, initial: int, docs: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="tok", unit_scale=True, disable=not enabled,
                        desc="tokenize", dynamic_ncols=True)
        self.t0, self.docs0, self.docs, self.last = time.perf_counter(), docs, docs, 0.0

    def update(self, tokens: int) -> None:
        self.docs += 1
        self.bar.update(tokens)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix(docs_s=f"{(self.docs - self.docs0) / max(now - self.t0, 1e-9):,.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Job:
    """Everything checked and resolved before the first byte is written."""

    cfg: TokenizeConfig
    tok: LFM2Tokenizer
    tok_path: Path
    dtype: np.dtype
    spec: EncoderSpec
    plans: list[SourcePlan]
    sources: list[LoadedSource]
    fingerprint: str
    identity: dict[str, Any]
    inputs: list[Any]  # [path, bytes, mtime_ns] per input file
    copy_tokenizer: bool


def prepare_job(cfg: TokenizeConfig) -> Job:
    """Check options, mixture, tokenizer, dtype and every source; raises before anything is written."""
    _check_options(cfg)
    plans = plan_mixture(cfg)
    tok, tok_path = _load_tokenizer(cfg.tokenizer)
    dtype = _resolve_dtype(cfg.dtype, tok.vocab_size, str(tok_path))
    spec = _encoder_spec(cfg, tok, dtype)
    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()
    sources = [load_source(s, cfg.cache_dir) for s in cfg.sources]
    fingerprint = tok.fingerprint()
    copy = cfg.copy_tokenizer and _needs_tokenizer_copy(Path(cfg.output_dir) / TOKENIZER_DIR, fingerprint,
                                                        cfg.overwrite)
    return Job(cfg=cfg, tok=tok, tok_path=tok_path, dtype=dtype, spec=spec, plans=plans, sources=sources,
               fingerprint=fingerprint, identity=_identity(cfg, fingerprint, dtype, sources),
               inputs=[[f["path"], f["bytes"], f["mtime_ns"]] for s in sources for f in s.file_info],
               copy_tokenizer=copy)


def run(cfg: TokenizeConfig | DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Run the job; returns a summary (status, output_dir, shards, documents, tokens, throughput, …)."""
    cfg = as_config(cfg)
    t0 = time.perf_counter()
    job = prepare_job(cfg)
    out = Path(cfg.output_dir)
    state = prepare_output(out, cfg, job.identity, job.inputs)
    if state is not None and "complete" in state:
        manifest = state["complete"]
        log.info("%s already holds this dataset (%d shards, %d tokens)", out, len(manifest.shards),
                 manifest.num_tokens)
        return _summary("already_complete", out, manifest.shards, manifest.sources, 0, 0, t0)

    shard_entries: list[dict[str, Any]] = state["shards"] if state else []
    cursors = ([Cursor(**c) for c in shard_entries[-1]["cursors"]] if shard_entries
               else [Cursor() for _ in job.sources])
    if shard_entries:
        log.info("resuming after %d verified shard(s)", len(shard_entries))
    mixer = Mixer(job.plans, [s.num_rows for s in job.sources], cursors)
    state_doc = {"version": STATE_VERSION, "job_hash": _job_hash(job.identity), "inputs": job.inputs,
                 "shards": shard_entries}
    status, new_tokens, new_docs = write_shards(job, mixer, out, state_doc)
    infos = [ShardInfo(**e["info"]) for e in shard_entries]
    source_entries = _source_entries(job.sources, mixer)
    summary = _summary(status, out, infos, source_entries, new_tokens, new_docs, t0)
    if status == "stopped":
        log.info("stopped after %d shard(s) (stop_after_shards); rerun to continue", len(infos))
        return summary
    manifest = Manifest(
        tokenizer_fingerprint=job.fingerprint, vocab_size=job.tok.vocab_size, dtype=job.dtype.name,
        separator_id=job.spec.separator_id, shards=infos, sources=source_entries,
        fim=_fim_entry(cfg, job.spec, cursors),
        extra={"job": "data_pipelines.tokenize", "config": {**_config_dict(cfg), "tokenizer": str(job.tok_path)},
               "config_hash": sha256_json(job.identity), "inputs": job.identity["inputs"]},
    )
    if job.copy_tokenizer:
        job.tok.save_pretrained(out / TOKENIZER_DIR)
    manifest.save(out)  # last: from here on the directory is a dataset
    (out / STATE_FILE).unlink(missing_ok=True)
    log.info("wrote %d shard(s), %d documents, %d tokens to %s (%.0f tokens/s)", len(infos),
             manifest.num_documents, manifest.num_tokens, out, summary["tokens_per_s"])
    return summary


def write_shards(job: Job, mixer: Mixer, out: Path, state_doc: dict[str, Any]) -> tuple[str, int, int]:
    """The main loop: next document from the mixer, into the current shard; flush + checkpoint when full.

    Returns (status, new tokens, new documents); status is "stopped" when `stop_after_shards` cut it short.
    """
    cfg, cursors = job.cfg, mixer.cursors
    executor = Executor(job.spec, cfg.num_workers)
    streams = [SourceStream(s, c.consumed, cfg.batch_size, executor.submit, executor.depth, once=p.anchor)
               for s, c, p in zip(job.sources, cursors, job.plans)]
    targets = [p.target for p in job.plans]
    total = sum(targets) if all(t is not None for t in targets) else None  # type: ignore[arg-type]
    progress = _Progress(cfg.progress, total, sum(c.tokens for c in cursors), sum(c.documents for c in cursors))
    parts: list[np.ndarray] = []
    shard_len = written_now = new_tokens = new_docs = 0
    ok, status = False, "complete"
    try:
        while (i := mixer.pick()) is not None:
            tokens, mode = streams[i].next()
            cur = cursors[i]
            if mode == SKIPPED:
                cur.consumed += 1
                cur.skipped += 1
                continue
            if parts and shard_len + len(tokens) > cfg.shard_tokens:
                _flush(out, parts, cursors, state_doc)  # checkpoint *before* this document is counted
                parts, shard_len, written_now = [], 0, written_now + 1
                if cfg.stop_after_shards is not None and written_now >= cfg.stop_after_shards:
                    status = "stopped"
                    break
            parts.append(tokens)
            shard_len += len(tokens)
            cur.consumed += 1
            cur.documents += 1
            cur.tokens += len(tokens)
            cur.psm += mode == PSM
            cur.spm += mode == SPM
            new_tokens += len(tokens)
            new_docs += 1
            progress.update(len(tokens))
        if status == "complete" and parts:
            _flush(out, parts, cursors, state_doc)
        ok = True
    finally:
        progress.close()
        executor.close(ok)
    return status, new_tokens, new_docs


def _flush(out: Path, parts: list[np.ndarray], cursors: list[Cursor], state_doc: dict[str, Any]) -> None:
    """Write the next shard, then checkpoint: shards so far + per-source positions after this shard."""
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    name = f"shard-{len(state_doc['shards']):05d}"
    info = write_shard(out, name, np.concatenate(parts), offsets)
    state_doc["shards"].append({"info": asdict(info), "cursors": [asdict(c) for c in cursors]})
    write_json_atomic(out / STATE_FILE, state_doc)


def _source_entries(sources: list[LoadedSource], mixer: Mixer) -> list[dict[str, Any]]:
    entries = []
    for i, (s, c) in enumerate(zip(sources, mixer.cursors)):
        sc = s.config
        entries.append({
            "name": sc.name, "path": sc.path, "format": s.format, "files": len(s.files), "rows": s.num_rows,
            "text_field": sc.text_field, "code": sc.code, "weight": sc.weight, "token_budget": sc.token_budget,
            "target_tokens": mixer.target(i) if not mixer.plans[i].anchor else c.tokens,
            "documents": c.documents, "tokens": c.tokens, "rows_read": c.consumed,
            "epochs": round(c.consumed / s.num_rows, 6), "skipped_empty": c.skipped,
            "fim_psm": c.psm, "fim_spm": c.spm,
        })
    return entries


def _fim_entry(cfg: TokenizeConfig, spec: EncoderSpec, cursors: list[Cursor]) -> dict[str, Any]:
    pre, mid, suf = spec.fim_ids or (None, None, None)
    return {
        "rate": spec.fim_rate, "spm_rate": cfg.fim.spm_rate, "seed": cfg.seed,
        "sources": [s.name for s in cfg.sources if s.code],
        "psm_layout": PSM_LAYOUT, "spm_layout": SPM_LAYOUT,
        "split": "two uniform character cut points, parts tokenized separately",
        "token_ids": {"fim_pre": pre, "fim_mid": mid, "fim_suf": suf},
        "documents_psm": sum(c.psm for c in cursors), "documents_spm": sum(c.spm for c in cursors),
    }


def _summary(status: str, out: Path, shards: list[ShardInfo], sources: list[dict[str, Any]], new_tokens: int,
             new_docs: int, t0: float) -> dict[str, Any]:
    seconds = time.perf_counter() - t0
    return {
        "status": status, "output_dir": str(out), "shards": len(shards),
        "documents": sum(s.documents for s in shards), "tokens": sum(s.tokens for s in shards),
        "new_tokens": new_tokens, "new_documents": new_docs, "seconds": seconds,
        "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
        "docs_per_s": new_docs / seconds if seconds > 0 else 0.0,
        "sources": {s["name"]: {"documents": s["documents"], "tokens": s["tokens"]} for s in sources},
    }


# ---------------------------------------------------------------------------------------------- CLI
JOB = DataJob("tokenize", TokenizeConfig, run, summary=without("sources"))
register_configs, main = JOB.register_configs, JOB.main

if __name__ == "__main__":
    main()
