"""DeepSpeed ZeRO 1/2/3 behind the same interface as `TorchBackend`.

The trainer owns the loop: gradient accumulation, loss normalisation (by the labelled tokens of the global
batch), the LR schedule, the skip-on-non-finite policy and checkpoint layout. DeepSpeed here only partitions
optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3) and runs *our* torch AdamW on its
partitions. So the DeepSpeed config is generated from our config, never read from a JSON file:

- `gradient_accumulation_steps=1`: `engine.backward` divides the loss by GAS, and our loss is already scaled
  by `world / n_global`; GAS 1 makes that division (and the per-tensor hook division) a no-op. The real
  accumulation boundary is set per micro-step with `set_gradient_accumulation_boundary`, so ZeRO-1 reduces
  only on the last micro-step and `engine.step()` applies the update exactly once per optimizer step.
- `gradient_clipping=optim.grad_clip`, always explicit (DeepSpeed's own default is 1.0). ZeRO clips inside
  its step with the same formula as `torch.nn.utils.clip_grad_norm_` (coef = max / (norm + 1e-6), clamped to
  1), on the same global norm we report.
- The optimizer is `build_optimizer(model)` (torch AdamW with our weight-decay groups and betas) passed as
  `optimizer=`: no fused / CPU-Adam op has to be JIT-built, and the update is the same elementwise math.
- No LR scheduler: `set_lr` writes the trainer's schedule into the engine's optimizer param groups.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ..model import LFM2ForCausalLM
from .checkpoint import refuse_foreign_objects
from .distributed import Runtime, apply_activation_checkpointing
from .optim import build_optimizer, set_lr

CHECKPOINT_TAG = "deepspeed"  # sub-directory of a trainer checkpoint holding DeepSpeed's per-rank shards
# The classes DeepSpeed's own ZeRO-1/2/3 files pickle (listed by torch.serialization.get_unsafe_globals_in_checkpoint
# on real checkpoints); anything else in a partition file is refused before DeepSpeed unpickles it.
DEEPSPEED_PICKLED_TYPES = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})
ZERO_STAGES = (1, 2, 3)
# Keys of the generated config that the trainer's exactness depends on: `distributed.deepspeed_config`
# may not override them (each has its own knob in our config, named in the error).
_RESERVED = {
    "train_batch_size": "trainer.micro_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.grad_accum",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "the optim group",
    "scheduler": "optim.schedule",
    "bf16": "trainer.precision",
    "fp16": "trainer.precision (fp16 is not supported)",
}


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def build_deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for this run, derived from ours (see the module docstring for why each key)."""
    t = cfg.trainer
    stage = int(cfg.distributed.zero_stage)
    if stage not in ZERO_STAGES:
        raise ValueError(f"distributed.zero_stage={stage}; choose one of {ZERO_STAGES}")
    bf16 = t.precision == "bf16"
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": 1,
        "train_batch_size": int(t.micro_batch_size) * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        # bf16: DeepSpeed's mixed precision (bf16 weights, fp32 master copies in the optimizer). The overflow
        # check must stay on: our skip of a non-finite step goes through DeepSpeed's overflow path.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": stage},
        "steps_per_print": None,
        "wall_clock_breakdown": False,
    }
    extra = cfg.distributed.get("deepspeed_config") or {}
    if extra:
        extra = OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else dict(extra)
        for key, knob in _RESERVED.items():
            if key in extra:
                raise ValueError(f"distributed.deepspeed_config.{key} is set by the trainer; use {knob}")
        if "stage" in (extra.get("zero_optimization") or {}):
            raise ValueError("distributed.deepspeed_config.zero_optimization.stage: use distributed.zero_stage")
        ds = _deep_merge(ds, extra)
    return ds


def _disable_cpu_shm_op() -> None:
    """On CPU, DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce op (a minute of g++, cached in
    ~/.cache/torch_extensions) that only `inference_all_reduce` uses. Training never calls it, so mark it
    incompatible: the engine then uses plain torch.distributed (gloo) and needs no compiler."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _ensure_process_group(runtime: Runtime) -> None:
    """DeepSpeed needs a process group and LOCAL_RANK even for one process; without a launcher, make a 1-rank
    gloo group from an in-memory store (no ports) and set the variables a launcher would have set."""
    if dist.is_initialized():
        return
    if runtime.world_size != 1:
        raise RuntimeError("WORLD_SIZE > 1 but no process group: construct the Runtime with Runtime.from_env")
    for name in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class DeepSpeedBackend:
    """ZeRO-1/2/3 with our torch AdamW. Attributes as `TorchBackend`: `model` (the engine: called like the
    module, it forwards `*args, **kwargs`), `raw` (the unwrapped module), `optimizer` (DeepSpeed's wrapper
    around our AdamW)."""

    def __init__(self, model: LFM2ForCausalLM, cfg: Any, runtime: Runtime) -> None:
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # the config dump and per-step INFO lines drown the progress bar
        self.runtime = runtime
        self.kind = "deepspeed"
        self.zero_stage = int(cfg.distributed.zero_stage)
        self.grad_clip = float(cfg.optim.grad_clip)
        if cfg.trainer.compile:
            raise ValueError("trainer.compile is not supported with distributed.backend=deepspeed (ZeRO-3 "
                             "parameter hooks and per-layer compile are untested together); use fsdp2 or ddp")
        self.raw = model.to(runtime.device)
        if cfg.trainer.activation_checkpointing:
            apply_activation_checkpointing(self.raw)
        # The state-dict layout (tied head included) before DeepSpeed swaps parameters for partitions.
        self._state_keys = list(self.raw.state_dict().keys())
        ds_config = build_deepspeed_config(cfg, runtime.world_size)
        _disable_cpu_shm_op()
        _ensure_process_group(runtime)
        optimizer = build_optimizer(self.raw, cfg.optim)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=self.raw, optimizer=optimizer, config=ds_config,
                                                          dist_init_required=False)
        if self.zero_stage == 3:
            # `LFM2ForCausalLM.forward` hands `self.lm_head.weight` to `head_fn` without calling `lm_head`, so
            # ZeRO-3's per-module hooks never gather it for that use. DeepSpeed's parameter-dict getter notices
            # such an access in eager mode and registers the weight the same way on first use (tied and untied
            # heads both train correctly without this line); registering it up front just does not depend on
            # that detection, which is skipped e.g. while torch.compile traces.
            from deepspeed.runtime.zero.partition_parameters import register_external_parameter

            for param in self.raw.lm_head.parameters():
                register_external_parameter(self.raw, param)
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        if not isinstance(ds_optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
            # e.g. bf16 + ZeRO-1 + data_types.grad_accum_dtype=fp32 selects BF16_Optimizer: its norm and
            # overflow paths differ from the ones `clip_grad_norm` and the skip rely on.
            raise ValueError(f"DeepSpeed chose {type(ds_optimizer).__name__} for this configuration; the trainer "
                             "supports the ZeRO stage 1/2/3 optimizers only (check distributed.deepspeed_config)")
        self.engine = engine
        self.model = engine
        self.optimizer = ds_optimizer
        self._pending = False  # gradients accumulated since the last step (or discard)
        self._last_norm: float | None = None

    # ------------------------------------------------------------------ the step
    def sync_context(self, last_micro_step: bool) -> AbstractContextManager:
        """Tell DeepSpeed where the accumulation boundary is (it cannot know: its GAS is 1). ZeRO-1 then reduces
        only on the last micro-step; ZeRO-2/3 reduce-scatter every micro-step and accumulate partitions."""
        self.engine.set_gradient_accumulation_boundary(last_micro_step)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # GAS is 1, so `scale_wrt_gas` divides by 1; pass False anyway so a changed config cannot rescale.
        self.engine.backward(loss, scale_wrt_gas=False)
        self._pending = True

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def _global_grad_norm(self) -> float:
        """The L2 norm of the reduced (averaged) gradients over all ranks, as ZeRO's step will compute it.

        Collective. DeepSpeed reports an inf/NaN group norm as -1; we return inf for those."""
        from deepspeed.runtime.utils import combine_grad_norm_groups, is_invalid_grad_norm

        opt = self.optimizer
        if self.zero_stage == 3:
            norm = combine_grad_norm_groups(opt._get_norm_groups())
        else:
            norm = opt.scaled_global_norm()
        if is_invalid_grad_norm(norm):
            return math.inf
        return float(norm) / float(opt.loss_scale)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Return the global gradient norm *before* the step, so the loop can skip a non-finite one.

        Clipping itself happens inside `engine.step()` (ZeRO clips its fp32 gradient partitions with
        `gradient_clipping`, fixed at initialisation from `optim.grad_clip`), using this same norm."""
        if max_norm != self.grad_clip:
            raise ValueError(f"DeepSpeed clips at gradient_clipping={self.grad_clip} (optim.grad_clip at start); "
                             f"clip_grad_norm({max_norm}) cannot change it")
        self._last_norm = self._global_grad_norm()
        return self._last_norm

    def step(self) -> None:
        self.engine.step()
        self._pending = False
        if not self.engine.was_step_applied():
            raise RuntimeError(f"DeepSpeed skipped an optimizer step whose gradient norm we measured as "
                               f"{self._last_norm}; refusing to continue with the trainer's step count wrong")

    def zero_grad(self) -> None:
        """After a step DeepSpeed has already released the gradients. With gradients still pending (the loop
        skipped a non-finite step), discard them through DeepSpeed's own overflow path: `engine.step()` with
        the norm forced to inf clears every gradient buffer and partition and leaves weights, optimizer state
        and the micro-step counters as if the step never happened."""
        if not self._pending:
            return
        with self._forced_overflow():
            self.engine.step()
        self._pending = False
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step that should have been discarded (non-finite step)")

    @contextmanager
    def _forced_overflow(self):
        """Make the ZeRO optimizer's own norm computation report inf for one step (instance attribute shadows
        the method; every rank does the same, so no collective is left unmatched)."""
        opt = self.optimizer
        name = "_get_norm_groups" if self.zero_stage == 3 else "scaled_global_norm"
        inf = torch.tensor(math.inf, dtype=torch.float32, device=self.runtime.device)
        setattr(opt, name, (lambda *a, **k: [inf]) if self.zero_stage == 3 else (lambda *a, **k: inf))
        try:
            yield
        finally:
            delattr(opt, name)

    # ------------------------------------------------------------------ checkpoints
    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Unsharded fp32 weights on CPU, read from the optimizer's fp32 master partitions (so exact under
        bf16 too). Collective: every rank must call it; only rank 0 keeps the tensors, others get {}."""
        from deepspeed.utils import safe_get_full_fp32_param

        main = self.runtime.is_main
        params = dict(self.raw.named_parameters(remove_duplicate=False))
        buffers = dict(self.raw.named_buffers())
        gathered: dict[int, torch.Tensor | None] = {}  # a tied weight is gathered once, in the same order everywhere
        state: dict[str, torch.Tensor] = {}
        for key in self._state_keys:
            if key in params:
                param = params[key]
                if id(param) not in gathered:
                    full = safe_get_full_fp32_param(param)
                    if full is None:  # not managed by a ZeRO optimizer (frozen): the module holds it whole
                        full = param.detach()
                    # Other ranks drop their copy at once, so no rank but 0 ever holds the whole model.
                    gathered[id(param)] = full.detach().to("cpu", torch.float32) if main else None
                value = gathered[id(param)]
            elif key in buffers:
                value = buffers[key].detach().cpu()
            else:
                raise KeyError(f"state-dict key {key!r} is neither a parameter nor a buffer of the model")
            if main:
                state[key] = value
        return state

    def save(self, directory: Path, export: Any, asynchronous: bool = False, process_group: Any = None) -> None:
        """fp32 weights in Hugging Face format (`export(state, dir/"model")`, rank 0) + DeepSpeed's checkpoint
        (per-rank optimizer partitions) in `dir/deepspeed/`.

        Every rank writes its own shards into `directory`, which rank 0 created before this collective call
        started (the trainer's tmp dir; the filesystem must be shared across nodes). `save_checkpoint` ends
        with a barrier, so when rank 0 returns and hashes/renames the directory all shards are on disk."""
        state = self.full_model_state()
        if self.runtime.is_main:
            export(state, directory / "model")
        del state
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)
        dist.barrier()  # explicit, in case a DeepSpeed version drops the trailing barrier

    def load(self, directory: Path, load_weights: Any) -> None:
        """Weights and optimizer state from `dir/deepspeed/` (same world size and ZeRO stage as the writer;
        `dir/model` is the portable copy for anything else, e.g. `model.init_from`)."""
        if not (directory / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"{directory} has no {CHECKPOINT_TAG}/ sub-directory: it was not written by "
                                    f"distributed.backend=deepspeed. Resume with a torch backend (none | ddp | fsdp2, "
                                    f"any world size), or start a new run from its weights: export them with "
                                    f"`python -m lfm2_train.engine.dcp {directory} <out>` and set "
                                    f"model.init_from=<out>")
        shards = len(list((directory / CHECKPOINT_TAG).glob("*zero_pp_rank_*_optim_states.pt")))
        if shards != self.runtime.world_size:
            raise ValueError(f"{directory} holds DeepSpeed optimizer partitions for {shards} ranks; this run has "
                             f"{self.runtime.world_size}. Resume with {shards} processes, or start a new run from "
                             f"its weights with model.init_from={directory / 'model'}")
        # DeepSpeed unpickles its files in full; first make sure they hold nothing but DeepSpeed's own state.
        for part in sorted((directory / CHECKPOINT_TAG).glob("*.pt")):
            refuse_foreign_objects(part, DEEPSPEED_PICKLED_TYPES)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.load(weights_only) notices
            path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_module_strict=True,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {directory / CHECKPOINT_TAG}")
        self._pending = False
