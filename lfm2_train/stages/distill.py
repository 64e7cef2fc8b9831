"""`stage=distill`: the pretrain loop with L = CE + lambda * L_KD against a cached teacher top-K.

The teacher cache is read in lock-step with the token shards through each batch's `token_index`; it is
validated (dataset manifest hash, K, vocabulary, tokenizer, file sizes and hashes) before the first
step. Validation reports plain CE so KD and CE-only runs compare on the same number.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ..data.format import load_manifest
from ..data.teacher_cache import TeacherBatches, TeacherCache
from ..engine.callbacks import Callback
from ..engine.distributed import Runtime
from ..engine.job import build_job
from ..engine.trainer import Trainer
from ..hints import needs
from ..losses import KDParams, ce_kd_chunk, fused_head_loss, lm_loss


def anneal(start: float, end: float | None, progress: float, shape: str) -> float:
    """start -> end over training progress in [0, 1] (constant when end is None)."""
    if end is None:
        return start
    p = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        p = 0.5 * (1 - math.cos(math.pi * p))
    elif shape != "linear":
        raise ValueError(f"stage.kd.schedule={shape!r}; choose linear or cosine")
    return start + (end - start) * p


class DistillLoss(Callback):
    """Loss function object and trainer callback: holds the cache and the current (annealed) lambda and tau."""

    def __init__(self, cache: TeacherCache, kd_cfg: Any) -> None:
        self.cache = cache
        self.cfg = kd_cfg
        self.params = KDParams(method=kd_cfg.method, temperature=kd_cfg.temperature, weight=kd_cfg.weight,
                               weight_value=kd_cfg.weight_value, tau_squared=kd_cfg.tau_squared)
        self.kd_weight = kd_cfg.kd_weight

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self.anneal_to(step, trainer.cfg.trainer.max_steps)

    def anneal_to(self, step: int, max_steps: int) -> None:
        progress = step / max(max_steps - 1, 1)
        c = self.cfg
        tau = anneal(c.temperature, c.temperature_end, progress, c.schedule)
        self.kd_weight = anneal(c.kd_weight, c.kd_weight_end, progress, c.schedule)
        if tau != self.params.temperature:
            self.params = KDParams(method=c.method, temperature=tau, weight=c.weight, weight_value=c.weight_value,
                                   tau_squared=c.tau_squared)

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        if "teacher_ids" in batch:  # gathered with the batch (TeacherBatches), off the step's critical path
            ids, lp = batch["teacher_ids"], batch["teacher_logprobs"]
        else:
            ids, lp = self.cache.gather(batch["token_index"].cpu())
        device = batch["input_ids"].device
        head = partial(fused_head_loss, fn=ce_kd_chunk(self.params, self.kd_weight),
                       inputs=[batch["labels"], ids.to(device), lp.to(device)])
        loss, sums = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), head_fn=head)
        n = (batch["labels"] != -100).sum()
        metrics = {k: sums[k] for k in ("ce", "kd", "mass", "cond", "p_t", "q_t")}
        return loss, n, metrics


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    if not stage.teacher_cache:
        raise ValueError(needs("distill", "stage.teacher_cache=<directory written by stage=cache_teacher>"))
    runtime = Runtime.from_env(cfg.distributed)
    job = build_job(cfg, runtime)
    dataset_dir = Path(job.inputs["dataset"])
    cache = TeacherCache(stage.teacher_cache, load_manifest(dataset_dir), k=stage.k,
                         vocab_size=job.model.config.vocab_size,
                         tokenizer_fingerprint=job.inputs["tokenizer_fingerprint"],
                         verify_hashes=cfg.data.verify_hashes)
    job.train = TeacherBatches(job.train, cache)
    loss = DistillLoss(cache, stage.kd)
    job.loss_fn = loss
    job.eval_loss_fn = lm_loss
    job.callbacks.append(loss)
    job.inputs.update(teacher_cache=str(stage.teacher_cache), teacher=cache.manifest.teacher, k=cache.k)
    summary = Trainer(cfg, job, runtime).fit()
    if runtime.is_main:
        print(f"\ndistill: {summary['status']} at step {summary['steps']}; train loss {summary.get('loss')}, "
              f"val CE {summary.get('val_loss')}; output {cfg.output_dir}")
    return summary
