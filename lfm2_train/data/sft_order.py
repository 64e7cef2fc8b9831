"""The order SFT reads its conversations in: per-row difficulty (a dataset column or a difficulty file),
an easy -> hard curriculum built with the pre-training curriculum's methods, and the sequence of examples
over `stage.epochs` (or `trainer.max_steps`), with the optimizer steps it packs into."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .chat_dataset import EncodedRows
from .chat_sources import example_difficulty
from .curriculum_order import build_order
from .pacing import PacingConfig
from .sft_stream import count_rows, positions_needed
from .training_sequence import training_sequence


def row_difficulty(cfg: DictConfig, data: Any, row_index: np.ndarray) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Difficulty (higher = harder) of each usable example under `stage.curriculum`, with what to record."""
    cur = cfg.stage.curriculum
    return example_difficulty(data, row_index, source=cur.source, column=cur.column, file=cur.file,
                              keys="stage.curriculum")


def curriculum_order(difficulty: np.ndarray | None, cfg: DictConfig) -> np.ndarray | None:
    """Example indices easy -> hard (None without a curriculum), via the pre-training curriculum's methods."""
    if difficulty is None:
        return None
    cur = cfg.stage.curriculum
    if cur.method not in ("sort", "buckets"):
        raise ValueError(f"stage.curriculum.method={cur.method!r}; choose sort or buckets")
    return build_order(cur.method, difficulty, len(difficulty), n_buckets=cur.n_buckets, seed=cfg.data.seed)


def example_sequence(encoded: EncodedRows, train: np.ndarray, order: np.ndarray | None, cfg: DictConfig,
                     rows_per_step: float) -> tuple[np.ndarray, int]:
    """(the examples the run reads, in order; the number of optimizer steps).

    With `stage.epochs` the sequence is that many passes and the steps are the full steps it packs into;
    otherwise `trainer.max_steps` decides and the passes repeat until the sequence is long enough.
    `rows_per_step` counts chat rows only (fractional when pre-training rows are mixed in).
    """
    pacing = PacingConfig.from_dict(OmegaConf.to_container(cfg.data.pacing, resolve=True))
    seq_len, seed = cfg.data.seq_len, cfg.data.seed
    lengths = np.array([positions_needed(e) for e in encoded.examples])

    def build(n_samples: int) -> tuple[np.ndarray, int]:
        seq = training_sequence(train, order, pacing, n_samples, seed)
        return seq, count_rows(lengths[seq], seq_len)

    epochs = cfg.stage.epochs
    if epochs is not None:
        if epochs <= 0:
            raise ValueError(f"stage.epochs={epochs} must be > 0 (or null to let trainer.max_steps decide)")
        seq, rows = build(max(1, math.ceil(epochs * len(train))))
        steps = int(rows // rows_per_step)
        if steps < 1:
            raise ValueError(f"stage.epochs={epochs} over {len(train)} training conversations packs into {rows} "
                             f"rows, fewer than one step needs ({rows_per_step:g}); add data or epochs")
        return seq, steps
    steps = cfg.trainer.max_steps
    need = math.ceil(steps * rows_per_step)
    n_samples = math.ceil(1.25 * need * seq_len / max(float(lengths[train].mean()), 1.0)) + math.ceil(rows_per_step)
    seq, rows = build(n_samples)
    while rows < need:
        n_samples *= 2
        seq, rows = build(n_samples)
    return seq, steps
