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
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..config.paths import initialize_conf, recipe_names, recipe_path
from ..engine.flops import flops_per_token
from ..engine.model_setup import model_config
from ..engine.plan_report import GIB, Plan, markdown_table
from ..engine.planner import STAGE_KINDS, measure_step
from ..model import LFM2Config, LFM2ForCausalLM
from ..model.hf_io import read_config

_STATED = re.compile(r"micro_batch_size x GPUs x grad_accum = \d+ x (\d+) x \d+")


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
