"""Train a byte-level BPE tokenizer: ``python -m data_pipelines.train_tokenizer [overrides]``.

LFM2's special tokens take ids 0-13 (``lfm2_train.tokenizer.LFM2_SPECIAL_TOKENS``) and the ChatML chat
template is attached, so the result drops into every other stage; the output directory is what
``LFM2Tokenizer.from_pretrained`` and ``transformers.AutoTokenizer.from_pretrained`` load (offline).
Inputs are read with the same loaders as the tokenize job (json / jsonl / parquet / text files, globs,
directories); by default the bundled corpus. Training is deterministic for the same inputs in the same order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lfm2_train.data.format import write_json_atomic
from lfm2_train.tokenizer import LFM2_SPECIAL_TOKENS, train_bpe_tokenizer

from ._job import DataJob
from .corpus import bundled_corpus_files
from .sources import LoadedSource, SourceConfig, load_source

log = logging.getLogger(__name__)

BYTE_ALPHABET = 256
MIN_VOCAB = len(LFM2_SPECIAL_TOKENS) + BYTE_ALPHABET  # specials + the 256 byte symbols, before any merge
TRAINING_INFO = "tokenizer_training.json"


@dataclass
class TrainTokenizerConfig:
    """`python -m data_pipelines.train_tokenizer`: text files → HF tokenizer directory."""

    inputs: list[str] = field(default_factory=list)  # files / globs / directories; empty = the bundled corpus
    text_field: str = "text"
    vocab_size: int = 8192  # including the 14 special tokens
    min_frequency: int = 2  # a pair must occur this often to be merged
    max_documents: int | None = None  # read at most this many documents (in input order)
    output_dir: str = "outputs/tokenizer"
    overwrite: bool = False  # replace a tokenizer already in output_dir
    cache_dir: str | None = None  # `datasets` cache; None = its default


class TrainTokenizerError(ValueError):
    """The tokenizer job cannot run as configured."""


def as_config(cfg: TrainTokenizerConfig | DictConfig | dict[str, Any]) -> TrainTokenizerConfig:
    """A typed config from a dataclass, a Hydra DictConfig or a plain dict (validated by OmegaConf)."""
    if isinstance(cfg, TrainTokenizerConfig):
        return cfg
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainTokenizerConfig), cfg))  # type: ignore


def load_inputs(cfg: TrainTokenizerConfig) -> list[LoadedSource]:
    """Each input (or each bundled corpus file) as a checked source; errors name the input."""
    if cfg.inputs:
        specs = [SourceConfig(name=path, path=path, text_field=cfg.text_field) for path in cfg.inputs]
    else:
        specs = [SourceConfig(name=name, path=str(path)) for name, path in bundled_corpus_files().items()]
    return [load_source(spec, cfg.cache_dir) for spec in specs]


def iter_texts(sources: list[LoadedSource], max_documents: int | None = None,
               batch_size: int = 1000) -> Iterator[list[str]]:
    """Non-empty texts in input order, in lists (the BPE trainer counts a batch at a time)."""
    remaining = max_documents if max_documents is not None else float("inf")
    for source in sources:
        for start in range(0, source.num_rows, batch_size):
            if remaining <= 0:
                return
            stop = int(min(start + batch_size, source.num_rows, start + remaining))
            remaining -= stop - start
            yield [t for t in source.texts(start, stop) if t]


def run(cfg: TrainTokenizerConfig | DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Train and save; returns output_dir, vocab_size, fingerprint, documents and seconds."""
    cfg = as_config(cfg)
    t0 = time.perf_counter()
    if cfg.vocab_size < MIN_VOCAB:
        raise TrainTokenizerError(f"vocab_size={cfg.vocab_size} is below {MIN_VOCAB} (the {len(LFM2_SPECIAL_TOKENS)} "
                                  f"special tokens + {BYTE_ALPHABET} byte symbols): there would be no room for merges")
    out = Path(cfg.output_dir)
    if (out / "tokenizer.json").exists() and not cfg.overwrite:
        raise TrainTokenizerError(f"{out} already holds a tokenizer; choose another output_dir or set overwrite=true")
    sources = load_inputs(cfg)  # every input is checked before training starts
    counted = {"documents": 0}

    def counting() -> Iterator[list[str]]:
        for batch in iter_texts(sources, cfg.max_documents):
            counted["documents"] += len(batch)
            yield batch

    tok = train_bpe_tokenizer(counting(), vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency)
    if tok.vocab_size < cfg.vocab_size:
        log.warning("the corpus only supports %d tokens (asked for %d): too little text for that many merges",
                    tok.vocab_size, cfg.vocab_size)
    tok.save_pretrained(out)
    fingerprint = tok.fingerprint()
    info = {
        "config": asdict(cfg), "vocab_size": tok.vocab_size, "fingerprint": fingerprint,
        "documents": counted["documents"],
        "inputs": [{"name": s.config.name, "files": [f["path"] for f in s.file_info], "rows": s.num_rows}
                   for s in sources],
    }
    write_json_atomic(out / TRAINING_INFO, info)
    seconds = time.perf_counter() - t0
    log.info("trained a %d-token tokenizer on %d documents in %.1f s: %s", tok.vocab_size, counted["documents"],
             seconds, out)
    return {"output_dir": str(out), "vocab_size": tok.vocab_size, "fingerprint": fingerprint,
            "documents": counted["documents"], "seconds": seconds}


JOB = DataJob("train_tokenizer", TrainTokenizerConfig, run)
register_configs, main = JOB.register_configs, JOB.main

if __name__ == "__main__":
    main()
