"""`stage=chain` (the default): run a whole pipeline from one chain file (`stage.chain`, default `tiny`).

The work directory is fixed (not timestamped) so that running the same command again skips finished steps
and continues an interrupted one. Chain-wide `seed` / `threads` reach every stage step and are part of each
step's fingerprint; `logger.*` and `trainer.progress_bar` reach them too but change no result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..chain import ChainInterrupted, ChainRunner, load_chain
from ..chain.report import format_table, write_report
from ..chain.runner import model_dir_of, step_dirs
from ..chain.spec import substitute
from ..config.paths import initialize_conf


def compose_stage(overrides: list[str]) -> DictConfig:
    """The full config of one step, composed like the command line would (typos are named)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="lfm2_train", overrides=overrides)
    with initialize_conf():
        return compose(config_name="lfm2_train", overrides=overrides)


def _run_one(overrides: list[str]) -> dict[str, Any]:
    from . import run_stage

    return run_stage(compose_stage(overrides))


LM_EVAL_SEQ_LEN = 256


def make_evaluator(n: int, seed: int, levels: list[int] | None, lm_data: Path | None = None):
    """Task accuracy (chat arithmetic) and, with `lm_data`, the LM loss on that dataset's held-out documents
    (the split every stage holds out), so the table shows what fine-tuning did to the language model."""
    def evaluate(model_dir: Path) -> dict[str, Any]:
        from ..evaluation import arithmetic_accuracy
        from ..evaluation.perplexity import validation_loss
        from ..model.peft_io import load_model
        from ..tokenizer import LFM2Tokenizer

        model = load_model(model_dir).eval()  # a LoRA step's adapter directory is folded into its base
        tokenizer = LFM2Tokenizer.from_pretrained(model_dir)
        metrics = dict(arithmetic_accuracy(model, tokenizer, n=n, seed=seed, levels=levels))
        if lm_data is not None:
            metrics["lm_loss"] = validation_loss(model, lm_data, seq_len=LM_EVAL_SEQ_LEN)["loss"]
        return metrics

    return evaluate


def metric_legend(n: int, seed: int, levels: list[int] | None, lm_data: str | None) -> str:
    """Which problem set and which documents the table's metric columns measure (other tools' numbers for the
    same model differ when their sets differ: merge selection and stage=eval draw their own problems)."""
    where = f"levels {levels}" if levels is not None else "all levels"
    text = f"task_acc: chat arithmetic, {n} problems ({where}, seed {seed}), greedy, exact answer."
    if lm_data:
        text += f" lm_loss: nats/token on the held-out documents of {lm_data} (seq {LM_EVAL_SEQ_LEN})."
    return text


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    spec = load_chain(stage.chain)
    if stage.until is not None and stage.until not in [s.name for s in spec.steps]:
        raise ValueError(f"stage.until={stage.until!r} is not a step of {spec.source}")
    workdir = Path(stage.workdir or Path("outputs") / f"chain-{spec.name}").resolve()
    if stage.until is not None:
        spec.steps = spec.steps[: [s.name for s in spec.steps].index(stage.until) + 1]
    levels = list(stage.eval_levels) if stage.eval_levels is not None else spec.eval_levels
    settings = [f"seed={cfg.seed}"] + ([f"threads={cfg.threads}"] if cfg.threads else [])
    lg = cfg.logger
    cosmetic = [f"logger.wandb={lg.wandb}", f"logger.wandb_mode={lg.wandb_mode}", f"logger.project={lg.project}",
                f"logger.plot={lg.plot}", f"trainer.progress_bar={cfg.trainer.progress_bar}"]
    if cfg.trainer.stop_after_steps is not None:  # debug: the first training step stops there, as if killed
        cosmetic.append(f"trainer.stop_after_steps={cfg.trainer.stop_after_steps}")
    print(f"chain {spec.name} ({len(spec.steps)} steps) in {workdir}")
    lm_data = Path(substitute(spec.eval_lm_data, step_dirs(spec, workdir))) if spec.eval_lm_data else None
    runner = ChainRunner(spec=spec, workdir=workdir, run_stage=_run_one,
                         evaluate=make_evaluator(stage.eval_problems, stage.eval_seed, levels, lm_data),
                         settings=settings, cosmetic=cosmetic,
                         eval_key=json.dumps([stage.eval_problems, stage.eval_seed, levels, spec.eval_lm_data,
                                              LM_EVAL_SEQ_LEN]))
    started = time.perf_counter()
    try:
        records = runner.run()
    except ChainInterrupted as stop:
        print(f"\n{stop}")
        return {"status": "interrupted", "workdir": str(workdir), "message": str(stop)}
    total = time.perf_counter() - started
    last = records[-1]
    output = model_dir_of(last.summary, step_dirs(spec, workdir)[last.name])
    legend = metric_legend(stage.eval_problems, stage.eval_seed, levels,
                           str(lm_data.relative_to(workdir)) if lm_data and lm_data.is_relative_to(workdir) else
                           (str(lm_data) if lm_data else None))
    report = write_report(spec, workdir, records, total, output, legend)
    print(f"\n{format_table(records)}\n{legend}\n\nchain {spec.name}: {total:.0f} s; report {report}"
          + (f"; model {output}" if output else ""))
    return {"status": "finished", "workdir": str(workdir), "report": str(report), "seconds": round(total, 1),
            "final": str(output) if output else None, "steps": [r.row() for r in records]}
