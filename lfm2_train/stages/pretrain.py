"""`stage=pretrain`: next-token prediction on packed token shards, in curriculum order when one is given.

Mid-training is the same stage with `recipe=midtrain`: longer sequences, `optim.schedule=decay`, and
`model.init_from` pointing at a pre-training output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..engine.distributed import Runtime
from ..engine.job import build_job
from ..engine.trainer import Trainer


def run(cfg: DictConfig) -> dict[str, Any]:
    runtime = Runtime.from_env(cfg.distributed)
    job = build_job(cfg, runtime)
    n_params = job.model.num_parameters()  # before ZeRO-3 replaces the parameters by empty partitions
    summary = Trainer(cfg, job, runtime).fit()
    if runtime.is_main:
        print(f"\n{cfg.stage.name}: {summary['status']} at step {summary['steps']} "
              f"({n_params / 1e6:.2f}M params, {summary['tokens']} tokens, {summary['seconds']}s); "
              f"train loss {summary.get('loss')}, val loss {summary.get('val_loss')}; output {Path(cfg.output_dir)}")
    return summary
