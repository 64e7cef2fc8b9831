"""A candidate's quality estimate: a short pre-training run with the pre-training job builder
(`engine/job.py`) and trainer, then the validation loss on the held-out documents (`evaluation.validation_loss`).

Short proxies rank architectures, they do not predict final losses: every candidate gets the same data,
seed, steps, tokens and learning-rate schedule, so the differences come from the layout.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..engine.distributed import Runtime
from ..engine.job import build_job
from ..engine.trainer import Trainer
from ..evaluation import validation_loss
from .space import Candidate


def proxy_config(cfg: DictConfig, candidate: Candidate, out_dir: Path, dataset: tuple[Path, Path] | None = None
                 ) -> DictConfig:
    """The search run's config turned into a pretrain config for one candidate. `dataset` = (dataset dir,
    tokenizer dir) already resolved and verified by the caller (then not re-hashed per candidate)."""
    s = cfg.stage
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    sub.stage = {"name": "pretrain"}
    sub.model.init_from = None
    sub.model.overrides = dict(candidate.overrides)
    if dataset is not None:
        sub.data.update(path=str(dataset[0]), tokenizer=str(dataset[1]), verify_hashes=False)
    sub.data.seq_len = s.train_seq_len
    sub.trainer.update(max_steps=s.train_steps, micro_batch_size=s.train_batch_size, grad_accum=1, eval_every=0,
                       eval_batches=0, checkpoint_every=0, keep_last=1, resume="never", progress_bar=False,
                       stop_after_steps=None)
    sub.optim.warmup_steps = min(sub.optim.warmup_steps, max(s.train_steps // 5, 1))
    sub.logger.update(wandb=False, wandb_mode="disabled", plot=False)
    sub.distributed.backend = "none"
    sub.output_dir = str(out_dir)
    return sub


def train_and_score(cfg: DictConfig, candidate: Candidate, out_dir: Path, dataset: tuple[Path, Path] | None = None
                    ) -> dict[str, Any]:
    """-> {"val_loss", "train_loss", "train_seconds", "checkpoint"} for one candidate."""
    sub = proxy_config(cfg, candidate, out_dir, dataset)
    start = time.perf_counter()
    runtime = Runtime()
    job = build_job(sub, runtime)
    summary = Trainer(sub, job, runtime).fit()
    if summary["status"] != "finished":
        raise RuntimeError(f"proxy training of {candidate.name} stopped early ({summary['status']})")
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)  # resume state; the weights stay in final/
    data = sub.data
    val = validation_loss(job.model, job.inputs["dataset"], seq_len=data.seq_len,
                          max_documents=cfg.stage.val_documents, seed=data.seed, val_fraction=data.val_fraction)
    return {"val_loss": val["loss"], "train_loss": summary["loss"], "val_tokens": val["tokens"],
            "train_seconds": time.perf_counter() - start, "checkpoint": summary["final"]}
