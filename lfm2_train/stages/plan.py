"""`stage=plan`: will a training recipe fit its GPUs, and how fast would it go?

    python -m lfm2_train stage=plan recipe=lfm2-8b-a1b/pretrain plan.gpus=64 plan.gpu_memory_gb=80
    python -m lfm2_train stage=plan plan.all_recipes=true      # the table in docs/SCALING.md

The recipe is composed again without `stage=plan` (so its own stage, model, trainer and distributed
settings are what gets planned, with every other command-line override applied), its model is built at full
size on fake tensors and one training step runs through the trainer's backend (`engine/planner.py`). The
report gives per-rank peak memory by kind, a fits / DOES NOT FIT verdict against the GPU memory minus a
reserve, model FLOPs per token, and tokens/s at an assumed MFU and peak.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config.paths import initialize_conf, recipe_names, recipe_path
from ..engine.flops import FlopsPerToken, flops_per_token
from ..engine.planner import STAGE_KINDS, StepMemory, measure_step
from ..model import LFM2Config, LFM2ForCausalLM
from ..model.hf_io import read_config
from .common import model_config

GIB = 2**30
_STATED = re.compile(r"micro_batch_size x GPUs x grad_accum = \d+ x (\d+) x \d+")
NOTES = ("MoE routing balanced; torch.compile not applied; CPU autocast for CUDA autocast; attention FLOPs for "
         "one document per row; CUDA context / NCCL / fragmentation covered by plan.reserved_gb")


@dataclass
class Plan:
    recipe: str
    stage: str
    preset: str
    backend: str
    gpus: int
    seq_len: int
    rows_per_gpu: int  # micro_batch_size (pairs count two rows)
    grad_accum: int
    memory: StepMemory | None  # None: the stage does not train
    flops: FlopsPerToken | None
    params: int
    gpu_memory_gb: float
    reserved_gb: float
    mfu: float
    peak_tflops: float
    seconds: float = 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.rows_per_gpu * self.gpus * self.grad_accum * self.seq_len

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.peak / GIB + self.reserved_gb <= self.gpu_memory_gb

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.mfu * self.peak_tflops * 1e12 / self.flops.total if self.flops else 0.0

    def verdict(self) -> str:
        if self.memory is None:
            return f"stage={self.stage} does not train: nothing to plan"
        need = self.memory.peak / GIB
        if self.fits:
            return f"fits: {need:.1f} GiB per rank + {self.reserved_gb:g} reserved <= {self.gpu_memory_gb:g} GiB"
        return (f"DOES NOT FIT: {need:.1f} GiB per rank + {self.reserved_gb:g} reserved > {self.gpu_memory_gb:g} "
                f"GiB per GPU on {self.gpus} GPU(s); lower trainer.micro_batch_size (raise grad_accum), turn on "
                "trainer.activation_checkpointing, or shard with distributed=fsdp2")

    def report(self) -> str:
        lines = [f"plan: recipe={self.recipe} stage={self.stage} model={self.preset} "
                 f"({self.params / 1e6:,.1f}M params) distributed={self.backend} on {self.gpus} GPU(s) x "
                 f"{self.gpu_memory_gb:g} GiB"]
        if self.memory is None:
            return "\n".join([*lines, f"  {self.verdict()}"])
        lines.append(f"  batch: {self.rows_per_gpu} row(s)/GPU x {self.seq_len} tokens x grad_accum {self.grad_accum} "
                     f"= {self.tokens_per_step:,} tokens per step")
        if self.memory is not None:
            m = self.memory
            lines.append(f"  per-rank peak: {m.peak / GIB:.2f} GiB = params {m.params / GIB:.2f} + grads "
                         f"{m.grads / GIB:.2f} + optimizer {m.optimizer / GIB:.2f} + activations "
                         f"{m.activations / GIB:.2f}")
        if self.flops is not None:
            tps = self.tokens_per_s_per_gpu
            lines.append(f"  model FLOPs/token: {self.flops.total / 1e9:.2f} GFLOP "
                         f"({self.flops.active_params / 1e9:.2f}B active weights; "
                         f"attention {self.flops.attention / 1e9:.2f} GFLOP)")
            lines.append(f"  at MFU {self.mfu:g} of {self.peak_tflops:g} TFLOP/s: {tps:,.0f} tokens/s per GPU, "
                         f"{tps * self.gpus:,.0f} tokens/s in all, {self.tokens_per_step / (tps * self.gpus):.2f} s "
                         "per step")
        lines.append(f"  {self.verdict()}")
        lines.append(f"  (assumed: {NOTES})")
        return "\n".join(lines)


def stated_gpus(recipe: str | None) -> int:
    """The GPU count a recipe's header states ("micro_batch_size x GPUs x grad_accum = 8 x 64 x 2"); 1 if none."""
    if not recipe:
        return 1
    path = recipe_path(recipe)
    match = _STATED.search(path.read_text()) if path is not None else None
    return int(match.group(1)) if match else 1


def shipped_recipes() -> list[str]:
    return recipe_names()


def compose_training_config(overrides: list[str]) -> DictConfig:
    """The config `python -m lfm2_train <overrides>` would run, composed inside or outside a Hydra app."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    from ..config import register_configs

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="lfm2_train", overrides=overrides)
    register_configs()
    with initialize_conf():
        return compose(config_name="lfm2_train", overrides=overrides)


def planned_model(cfg: DictConfig) -> LFM2Config:
    """`model.init_from`'s config.json when it exists (no weights are read), else the preset + overrides."""
    init = None if OmegaConf.is_missing(cfg.model, "init_from") else cfg.model.init_from
    if init and (Path(init) / "config.json").is_file():
        return read_config(init)
    return model_config(cfg.model)


def plan_config(train_cfg: DictConfig, settings: Any, recipe: str | None = None) -> Plan:
    """Plan the training config `train_cfg` on `settings.gpus` GPUs (None: the recipe's stated count)."""
    # No recipe, or one that picks no stage, leaves the default (the chain, which does not train): plan pretrain.
    stage = "pretrain" if train_cfg.stage.name == "chain" else train_cfg.stage.name
    if stage != train_cfg.stage.name:
        train_cfg = OmegaConf.merge(train_cfg, {"stage": {"name": stage}})
    config = planned_model(train_cfg)
    gpus = settings.gpus or stated_gpus(recipe)
    t = train_cfg.trainer
    pairs = stage == "preference"
    model = _meta_model(config)
    started = time.perf_counter()
    memory = measure_step(train_cfg, config, gpus) if stage in STAGE_KINDS else None
    return Plan(recipe=recipe or "(none)", stage=stage, preset=train_cfg.model.preset,
                backend=train_cfg.distributed.backend, gpus=gpus, seq_len=int(train_cfg.data.seq_len),
                rows_per_gpu=t.micro_batch_size * (2 if pairs else 1),
                grad_accum=t.grad_accum, memory=memory,
                flops=flops_per_token(model, int(train_cfg.data.seq_len)) if memory is not None else None,
                params=model.num_parameters(), gpu_memory_gb=settings.gpu_memory_gb, reserved_gb=settings.reserved_gb,
                mfu=settings.mfu, peak_tflops=settings.peak_tflops, seconds=time.perf_counter() - started)


def _meta_model(config: LFM2Config) -> LFM2ForCausalLM:
    import torch

    with torch.device("meta"):
        return LFM2ForCausalLM(config)


def markdown_table(plans: list[Plan]) -> str:
    head = ("| recipe | stage | model | dist | GPUs | rows/GPU x seq | accum | params | grads | optim | activ | "
            "peak GiB | fits? | GFLOP/token | tok/s/GPU |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        if p.memory is None:
            rows.append(f"| {p.recipe} | {p.stage} | | | | | | | | | | | no training step | | |")
            continue
        m = p.memory
        g = [f"{x / GIB:.1f}" for x in (m.params, m.grads, m.optimizer, m.activations, m.peak)]
        fits = "yes" if p.fits else "**DOES NOT FIT**"
        rows.append(f"| {p.recipe} | {p.stage} | {p.preset} | {p.backend} | {p.gpus} | "
                    f"{p.rows_per_gpu} x {p.seq_len} | {p.grad_accum} | {' | '.join(g)} | {fits} | "
                    f"{p.flops.total / 1e9:.2f} | "
                    f"{p.tokens_per_s_per_gpu:,.0f} |")
    return "\n".join(rows)


def _task_overrides() -> list[str]:
    """This run's command-line overrides, less the ones that select or configure the planner."""
    from hydra.core.hydra_config import HydraConfig

    keep = []
    for item in HydraConfig.get().overrides.task:
        key = item.lstrip("+~").split("=", 1)[0]
        if key == "stage" or key.startswith("plan.") or key == "plan" or key.startswith("hydra"):
            continue
        keep.append(item)
    return keep


def _recipe_of(overrides: list[str]) -> str | None:
    for item in overrides:
        if item.startswith("recipe="):
            return item.split("=", 1)[1]
    return None


def run(cfg: DictConfig) -> dict[str, Any]:
    settings = cfg.plan
    if settings.all_recipes or settings.recipes:
        plans = []
        for recipe in shipped_recipes() if settings.all_recipes else settings.recipes:
            train_cfg = compose_training_config([f"recipe={recipe}"])
            plan = plan_config(train_cfg, OmegaConf.merge(settings, {"gpus": None}), recipe)
            print(plan.report(), flush=True)
            plans.append(plan)
        table = markdown_table(plans)
        print("\n" + table)
        return {"status": "finished", "plans": len(plans), "table": table}
    overrides = _task_overrides()
    recipe = _recipe_of(overrides)
    plan = plan_config(compose_training_config(overrides), settings, recipe)
    print(plan.report())
    return {"status": "finished", "fits": plan.fits, "peak_gib": plan.memory.peak / GIB if plan.memory else None}
