"""Process groups, and the one place where the model is wrapped for training.

`parallelize` applies, in this fixed order: activation checkpointing -> torch.compile -> the data-parallel
wrapper (DDP / FSDP2), like torchtitan. DeepSpeed owns its optimizer step, so it has its own backend class.
The model code never imports anything from here.
"""

from __future__ import annotations

import os
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import LFM2ForCausalLM
from .checkpoint import load_tensors
from .dcp import DCP_DIR
from .dcp import load as dcp_load
from .dcp import save as dcp_save
from .meta_init import is_deferred, materialise
from .optim import build_optimizer, set_lr

BACKENDS = ("none", "ddp", "fsdp2", "deepspeed")
TIED_HEAD = "lm_head.weight"  # the embedding when tie_word_embeddings: not stored twice in a checkpoint


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, dist_cfg: Any) -> Runtime:
        """torchrun / deepspeed set RANK, WORLD_SIZE, LOCAL_RANK; without them this is one process."""
        if dist_cfg.backend not in BACKENDS:
            raise ValueError(f"distributed.backend={dist_cfg.backend!r}; choose one of {BACKENDS}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            if dist_cfg.backend == "none":
                raise ValueError(f"launched with WORLD_SIZE={world} but distributed.backend=none; "
                                 "choose distributed=ddp|fsdp2|zero1|zero2|zero3")
            backend = dist_cfg.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend)
        return cls(rank=rank, world_size=world, local_rank=local, device=device)

    def check_device(self, t: torch.Tensor, what: str = "collective") -> None:
        """Bookkeeping collectives take tensors on `device` only: NCCL reduces CUDA tensors and nothing else,
        so a CPU tensor here would fail the first step of a GPU run. Checked on every backend (gloo too), so
        CPU runs catch what NCCL would refuse."""
        if t.device != self.device:
            raise ValueError(f"{what}: tensor on {t.device}, but this run's collectives reduce tensors on "
                             f"{self.device} (keep bookkeeping tensors on runtime.device)")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, out of place. `t` must be on `device` (see `check_device`)."""
        self.check_device(t, "all_reduce_sum")
        if self.distributed:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def apply_activation_checkpointing(model: LFM2ForCausalLM) -> None:
    """Recompute each decoder layer in the backward; parameter names (and checkpoints) are unchanged."""
    for layer in model.model.layers:
        if getattr(layer, "_lfm2_ckpt", False):
            continue
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)
        layer._lfm2_ckpt = True


def apply_compile(model: LFM2ForCausalLM, backend: str = "inductor") -> None:
    """Compile each decoder layer in place (names unchanged, graphs small and reused across layers)."""
    for layer in model.model.layers:
        layer.compile(backend=backend)


class TorchBackend:
    """Single process, DDP or FSDP2 with a torch AdamW.

    `trainable_only` (LoRA): the frozen base is wrapped and sharded like any weight, but gradients, the
    optimizer and checkpoints cover only the parameters that require gradients.
    """

    def __init__(self, model: LFM2ForCausalLM, cfg: Any, runtime: Runtime, trainable_only: bool = False) -> None:
        self.runtime = runtime
        self.kind = cfg.distributed.backend
        self.trainable_only = trainable_only
        deferred = is_deferred(model)
        if deferred and self.kind != "fsdp2":
            materialise(model, runtime.device)
        self.raw = model if deferred else model.to(runtime.device)
        if cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(self.raw)
        if cfg.trainer.compile:
            apply_compile(self.raw, cfg.trainer.compile_backend)
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
            # No per-forward buffer broadcast from rank 0: the buffers are constants (RoPE), identical by
            # construction (expert_bias, updated from all-reduced loads), or per-rank on purpose (expert_load,
            # summed by the trainer) — overwriting a rank's expert_load mid-accumulation would lose its counts.
            self.model: nn.Module = DistributedDataParallel(self.raw, device_ids=ids, broadcast_buffers=False)
        elif self.kind == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            # bf16: parameters are cast to bf16 for the forward/backward (all-gathers move half the bytes),
            # gradients are reduced in fp32 into the fp32 sharded master weights the optimizer steps on.
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if cfg.trainer.precision == "bf16" else MixedPrecisionPolicy()
            for layer in self.raw.model.layers:
                fully_shard(layer, mp_policy=mp)
            self.model = fully_shard(self.raw, mp_policy=mp)
            if deferred:  # built on meta: only now, sharded, is storage allocated and initialised
                materialise(self.raw, runtime.device)
        else:
            self.model = self.raw
        self.optimizer = build_optimizer(self.raw, cfg.optim)

    def sync_context(self, last_micro_step: bool) -> AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
        if self.kind == "ddp" and not last_micro_step:
            return self.model.no_sync()
        if self.kind == "fsdp2":
            self.model.set_requires_gradient_sync(last_micro_step)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm  # a device tensor: the trainer reads it with the step's other numbers, in one sync

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoints
    def _trainable_names(self) -> set[str]:
        return {n for n, p in self.raw.named_parameters() if p.requires_grad}

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 state dict on CPU (collective under FSDP2: every rank must call it); only the
        trainable parameters with `trainable_only`."""
        if self.kind == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.trainable_only))
        keep = self._trainable_names() if self.trainable_only else None
        return {k: v.detach().cpu() for k, v in self.raw.state_dict().items() if keep is None or k in keep}

    def save(self, directory: Path, export: Any, asynchronous: bool = False, process_group: Any = None
             ) -> Future | None:
        """Model + optimizer state as a DCP directory (`directory/dcp`), each rank writing its own shards.

        Keyed by parameter name, so it loads at any world size and into none / ddp / fsdp2 (`load`). `export`
        is unused: the Hugging Face export happens at the end of a stage (or `engine.dcp.export_checkpoint`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # LoRA: the frozen base is model.init_from's, so only the adapters (and their optimizer state) are saved.
        options = StateDictOptions(ignore_frozen_params=self.trainable_only)
        model_state, optim_state = get_state_dict(self.raw, self.optimizer, options=options)
        if self.raw.config.tie_word_embeddings:
            model_state.pop(TIED_HEAD, None)  # the embedding itself: stored once (and restored by `load`)
        return dcp_save({"model": model_state, "optim": optim_state}, directory / DCP_DIR, process_group,
                        asynchronous)

    def load(self, directory: Path, load_weights: Any) -> None:
        """Resume from a DCP checkpoint written at any world size by none / ddp / fsdp2 (or, for checkpoints
        written before DCP, from `model/` + `optimizer.pt` by the same backend)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        if not (directory / DCP_DIR).is_dir():
            self._load_full(directory, load_weights)
            return
        options = StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)
        # get_state_dict also creates the optimizer state that DCP then fills in place
        model_state, optim_state = get_state_dict(self.raw, self.optimizer, options=options)
        tied = model_state.pop(TIED_HEAD, None) if self.raw.config.tie_word_embeddings else None
        state = {"model": model_state, "optim": optim_state}
        dcp_load(state, directory / DCP_DIR)
        if tied is not None and "model.embed_tokens.weight" in state["model"]:
            state["model"][TIED_HEAD] = state["model"]["model.embed_tokens.weight"]
        set_state_dict(self.raw, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)

    def _load_full(self, directory: Path, load_weights: Any) -> None:
        state = load_weights(directory / "model")
        optim = load_tensors(directory / "optimizer.pt")
        if self.trainable_only and set(state) != self._trainable_names():
            raise ValueError(f"checkpoint {directory} holds other trainable tensors than this model's adapters "
                             f"(missing {sorted(self._trainable_names() - set(state))[:4]}, unexpected "
                             f"{sorted(set(state) - self._trainable_names())[:4]}): another LoRA configuration?")
        if self.kind == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, strict=not self.trainable_only)
            set_model_state_dict(self.model, state, options=opts)
            set_optimizer_state_dict(self.model, self.optimizer, optim, options=opts)
        else:
            self.raw.load_state_dict(state, strict=not self.trainable_only)
            self.optimizer.load_state_dict(optim)


def builds_on_meta(cfg: Any) -> bool:
    """Whether stages should build the model on the meta device (the backend shards it, then initialises).
    Not with LoRA: adapters are attached to, and folded with, a base whose values exist."""
    lora = OmegaConf.select(cfg, "model.lora", default=None)
    with_lora = lora is not None and (lora.get("r", 0) > 0 or bool(lora.get("adapter")))
    return cfg.distributed.backend == "fsdp2" and not with_lora
