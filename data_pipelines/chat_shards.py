"""Chat data into token shards: ``python -m data_pipelines.chat_shards [overrides]``.

    # SFT conversations, ordered easy -> hard by their difficulty column (the order the stage would compute)
    python -m data_pipelines.chat_shards kind=sft dataset=chat.jsonl seq_len=2048 output_dir=data/chat \
        difficulty.source=column difficulty.method=buckets
    python -m lfm2_train stage=sft data.path=data/chat data.order=difficulty-buckets data.seq_len=2048 ...
    # preference pairs
    python -m data_pipelines.chat_shards kind=preference dataset=pairs.jsonl seq_len=2048 output_dir=data/pairs
    python -m lfm2_train stage=preference data.path=data/pairs data.seq_len=2048 ...

Writes the chat-shard format of ``lfm2_train/data/chat_shards.py`` (the pre-training shard format plus a
per-token mask and a per-document row index): documents exactly as the stages encode them, skip counts in
the manifest, a checkpoint after every shard (rerunning the same command resumes), ``manifest.json`` last.
With ``difficulty.source`` set (sft), it also writes ``scores/difficulty.npy`` and an order file
``order/<name>.npy`` through ``lfm2_train.data.format``, built by the same rule as ``stage.curriculum``;
with ``difficulty.seed`` equal to the stage's ``data.seed`` the stage trains on exactly the batches it would
build from the rows. See docs/DATA.md.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lfm2_train.data.chat_dataset import load_chat_rows
from lfm2_train.data.chat_shards import DEFAULT_SHARD_TOKENS, ChatSettings, ChatShards, write_chat_shards
from lfm2_train.data.chat_sources import example_difficulty
from lfm2_train.data.curriculum_order import build_order, shard_order
from lfm2_train.data.format import save_order, save_scores
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

from ._job import DataJob
from .scoring import as_config

DIFFICULTY_SOURCES = ("none", "column", "file")
ORDER_METHODS = ("sort", "buckets")


@dataclass
class DifficultyConfig:
    """An easy -> hard order of the SFT conversations, by the rule of the stage's `stage.curriculum`."""

    source: str = "none"  # none | column (a numeric row column) | file (data_pipelines.sft_difficulty output)
    column: str = "difficulty"
    file: str | None = None
    method: str = "sort"  # sort | buckets
    n_buckets: int = 10
    seed: int = 1234  # the stage's data.seed (ties, in-bucket shuffles): equal seeds give the stage's own order
    name: str | None = None  # order file name under order/; None = "difficulty-<method>"


@dataclass
class ChatShardsConfig:
    """`python -m data_pipelines.chat_shards`: SFT conversations or preference pairs -> chat shards."""

    kind: str = "sft"  # sft | preference
    dataset: str | None = None  # jsonl / json / parquet / csv file or directory; None (sft) = bundled arithmetic
    output_dir: str = "outputs/chat_shards"  # fixed by default so that rerunning the same command resumes
    tokenizer: str | None = None  # HF tokenizer directory (its chat template renders the rows); None = bundled tiny
    seq_len: int = 256  # the reading stage's data.seq_len: longer conversations / pairs are skipped (too_long)
    split: str = "train"
    messages_field: str = "messages"  # sft
    tools_field: str = "tools"  # sft
    plain_text: str = "chat"  # preference: string rows as chat turns (chat) or as they are (raw)
    bundled_rows: int = 2000  # sft, dataset=None: rows of chat arithmetic generated from bundled_seed
    bundled_seed: int = 0
    bundled_levels: list[int] | None = None
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # a shard closes before a document would take it past this
    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    overwrite: bool = False  # replace a dataset / an unfinished job made from other rows or settings
    cache_dir: str | None = None  # `datasets` cache for loading files
    stop_after_shards: int | None = None  # debug: stop (as if killed) after writing this many shards
    copy_tokenizer: bool = True  # save the tokenizer to <output_dir>/tokenizer


def _check(cfg: DictConfig) -> None:
    """Option errors, before any row is read."""
    ChatSettings(cfg.kind, cfg.seq_len, plain_text=cfg.plain_text)  # validates kind, seq_len, plain_text
    diff = cfg.difficulty
    if diff.source not in DIFFICULTY_SOURCES:
        raise ValueError(f"difficulty.source={diff.source!r}; choose one of {list(DIFFICULTY_SOURCES)}")
    if diff.source != "none" and cfg.kind != "sft":
        raise ValueError("difficulty orders SFT conversations; stage=preference shuffles its pairs every epoch")
    if diff.method not in ORDER_METHODS:
        raise ValueError(f"difficulty.method={diff.method!r}; choose one of {list(ORDER_METHODS)}")
    if cfg.kind == "preference" and cfg.dataset is None:
        raise ValueError("kind=preference needs dataset=<jsonl / parquet / dataset directory of pairs>")


def _write_order(out: Path, cfg: DictConfig, rows: Any) -> dict[str, Any]:
    """scores/difficulty.npy and order/<name>.npy from the configured difficulty of every conversation."""
    diff = cfg.difficulty
    shards = ChatShards(out)
    values, record = example_difficulty(rows, shards.row_index, source=diff.source, column=diff.column,
                                        file=diff.file)
    order = build_order(diff.method, values, len(values), n_buckets=diff.n_buckets, seed=diff.seed)
    save_scores(out, "difficulty", values, {"scorer": f"difficulty:{diff.source}", "difficulty": record},
                shards.manifest)
    shards_ranked, shard_means = shard_order(shards.manifest, values.astype(np.float32), diff.seed)
    name = diff.name or f"difficulty-{diff.method}"
    meta = {"scores": "difficulty", "scorer": f"difficulty:{diff.source}", "difficulty": record,
            "method": diff.method, "n_buckets": diff.n_buckets if diff.method == "buckets" else None,
            "seed": diff.seed, "shard_order": shards_ranked, "shard_mean_scores": shard_means,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = save_order(out, name, order, meta, shards.manifest)
    return {"name": name, "path": str(path), "method": diff.method, "difficulty": record}


def run(cfg: ChatShardsConfig | DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Write the chat shards `cfg` describes (and their order); returns a summary dict."""
    cfg = as_config(cfg, ChatShardsConfig)
    _check(cfg)
    t0 = time.perf_counter()
    tokenizer = LFM2Tokenizer.from_pretrained(Path(cfg.tokenizer).expanduser() if cfg.tokenizer
                                              else tiny_tokenizer_path())
    settings = ChatSettings(cfg.kind, cfg.seq_len, split=cfg.split, messages_field=cfg.messages_field,
                            tools_field=cfg.tools_field, plain_text=cfg.plain_text)
    rows = load_chat_rows(cfg.dataset, split=cfg.split, bundled_n=cfg.bundled_rows, bundled_seed=cfg.bundled_seed,
                          bundled_levels=cfg.bundled_levels, cache_dir=cfg.cache_dir)
    out = Path(cfg.output_dir)
    summary = write_chat_shards(out, rows, tokenizer, settings, shard_tokens=cfg.shard_tokens,
                                overwrite=cfg.overwrite, stop_after_shards=cfg.stop_after_shards,
                                copy_tokenizer=cfg.copy_tokenizer, extra={"job": "data_pipelines.chat_shards"})
    if summary["status"] != "stopped" and cfg.difficulty.source != "none":
        summary["order"] = _write_order(out, cfg, rows)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


JOB = DataJob("chat_shards", ChatShardsConfig, run)
register_configs, main = JOB.register_configs, JOB.main

if __name__ == "__main__":
    main()
