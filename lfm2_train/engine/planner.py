"""One training step at real size without the hardware: per-rank memory measured on fake tensors.

The model is built under `FakeTensorMode` (tensors with shapes, dtypes and storage sizes but no data) with a
fake process group of the planned world size, and wrapped by the trainer's own backend
(`engine/distributed.py`: activation checkpointing, then DDP / FSDP2), so the plan follows the code that
trains rather than a formula of it. After an optimizer step on zero gradients (which creates the AdamW
state), one whole step of `grad_accum` micro-steps runs through the backend's own gradient-sync context
(FSDP2 keeps unsharded gradients between unsynchronised micro-steps, which a formula easily forgets).
torch's `MemTracker` / `FSDPMemTracker` count live storage bytes by category and keep the peak. The same
function runs on real tensors, which is how the test holds the fake numbers to a real measurement.

Approximations, stated wherever a plan is printed: MoE routing is taken as perfectly balanced (the real
dispatch is data-dependent, which fake tensors cannot follow; the experts then run as batched matmuls, which
hold the same tensors as the per-expert loop); torch.compile is not applied (compiled
layers usually need less activation memory, so the plan errs high); CPU autocast stands in for CUDA
autocast (the same matmuls run in bf16); the CUDA context, NCCL buffers and allocator fragmentation are
not tensors and are covered by a reserve in the verdict (`engine/plan_report.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from ..losses import KDParams, ce_kd_chunk, fused_head_loss, lm_loss, pair_logps
from ..model import LFM2Config, LFM2ForCausalLM
from ..model.moe import Experts
from .backends import make_backend
from .distributed import Runtime

# What a stage's micro-batch looks like to the memory planner.
STAGE_KINDS = {"pretrain": "lm", "midtrain": "lm", "sft": "lm", "distill": "distill", "preference": "preference"}
PLANNABLE_BACKENDS = ("none", "ddp", "fsdp2")

# MemTracker / FSDPMemTracker category names -> the four numbers a plan reports.
_PARAMS = ("Parameter", "Buffer", "Sharded Param", "Unsharded Param", "All Gather")
_GRADS = ("Gradient", "Sharded Grad", "Unsharded Grad", "Reduce Scatter")
_OPTIM = ("Optstate", "OptState")


@dataclass(frozen=True)
class StepMemory:
    """Bytes alive on one rank at the step's peak, by what holds them."""

    params: int  # sharded + gathered parameters and buffers
    grads: int  # sharded + unsharded gradients and reduce-scatter buffers
    optimizer: int  # AdamW moments
    activations: int  # saved activations, temporaries of the backward, inputs
    peak: int  # their sum at the peak

    @classmethod
    def from_snapshot(cls, snapshot: dict[Any, int]) -> StepMemory:
        named = {getattr(k, "value", k): int(v) for k, v in snapshot.items() if getattr(k, "value", k) != "Total"}

        def total(names: tuple[str, ...]) -> int:
            return sum(v for k, v in named.items() if k in names)

        params, grads, optim = total(_PARAMS), total(_GRADS), total(_OPTIM)
        peak = sum(named.values())
        return cls(params=params, grads=grads, optimizer=optim, activations=peak - params - grads - optim, peak=peak)


def _balanced_bincount(original: Callable[..., torch.Tensor], input: torch.Tensor, weights: Any = None,
                       minlength: int = 0) -> torch.Tensor:
    """MoE routing under fake tensors: each expert gets an equal share of the token slots. Returned as a
    real tensor so the dispatch loop's `.tolist()` has numbers to read."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    if not isinstance(input, FakeTensor) or weights is not None or minlength < 1:
        return original(input, weights, minlength)
    base, extra = divmod(input.numel(), minlength)
    with unset_fake_temporarily():
        return torch.tensor([base + (i < extra) for i in range(minlength)], dtype=torch.long)


def _all_nonzero(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`nonzero` of a fake tensor has no data to read: every element counts as selected, the largest output
    (for preference pairs: every position a completion token, an upper bound on memory)."""
    from torch._subclasses.fake_tensor import FakeTensor

    def nonzero(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(t, FakeTensor) or args or kwargs:
            return original(t, *args, **kwargs)
        index = torch.arange(t.numel(), device=t.device)
        return torch.stack(torch.unravel_index(index, t.shape), dim=1) if t.dim() != 1 else index[:, None]

    return nonzero


def _stay_on_cpu(original: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
    """`module.to("cpu")` on fake CPU parameters is a no-op, but torch performs it by swapping each fake
    parameter, which fails for a tied one (the LM head shares the embedding); skip the no-op."""

    def to(module: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if not kwargs and len(args) == 1 and isinstance(args[0], (str, torch.device)) \
                and torch.device(args[0]).type == "cpu":
            return module
        return original(module, *args, **kwargs)

    return to


def _batched_experts(module: Any, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`Experts.forward` under balanced routing as three batched matmuls over (experts, capacity, dim) instead
    of a Python loop over experts: the same tensors in total (the per-expert slices of the loop sum to the
    N x k routed rows whatever the routing), a thirty-second of the operations to trace at 32 experts."""
    N, k = expert_idx.shape
    E, d = module.w1.shape[0], x.shape[-1]
    capacity = N * k // E
    order = expert_idx.flatten().argsort(stable=True)[: E * capacity]
    tokens = order // k
    xe = x[tokens].view(E, capacity, d)
    hidden = F.silu(xe @ module.w1.transpose(1, 2)) * (xe @ module.w3.transpose(1, 2))
    ye = (hidden @ module.w2.transpose(1, 2)).reshape(E * capacity, d)
    return torch.zeros_like(x).index_add_(0, tokens, ye * weights.flatten()[order, None].to(ye.dtype))


@contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """FakeTensorMode inside a fake process group of `world_size` ranks (this process is rank 0).

    The device mesh is built before fake mode starts (a mesh reads its rank list back as numbers) and handed
    to `fully_shard` as its default, so the backend's plain `fully_shard(module)` calls shard over it.
    """
    import torch.distributed.fsdp._fully_shard._fully_shard as fully_shard_module
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the planner runs in one plain process: a process group is already initialised "
                           "(do not launch stage=plan under torchrun)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        with mock.patch.object(fully_shard_module, "_init_default_mesh", lambda *a, **k: mesh), \
                mock.patch.object(torch, "bincount", partial(_balanced_bincount, torch.bincount)), \
                mock.patch.object(Experts, "forward", _batched_experts), \
                mock.patch.object(torch.Tensor, "nonzero", _all_nonzero(torch.Tensor.nonzero)), \
                mock.patch.object(torch.nn.Module, "to", _stay_on_cpu(torch.nn.Module.to)), \
                FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        dist.destroy_process_group()


def synthetic_batch(kind: str, config: LFM2Config, rows: int, seq_len: int, k: int = 32) -> dict[str, torch.Tensor]:
    """A micro-batch with the shapes and dtypes the stage's batch source produces (values do not matter
    for memory): packed rows with document ids, teacher top-K for distillation, (chosen, rejected) rows for
    preference pairs."""
    V = config.vocab_size
    if kind == "preference":
        ids = torch.randint(0, V, (rows, 2, seq_len))
        return {"input_ids": ids, "doc_ids": torch.zeros_like(ids), "targets": ids.clone(),
                "labels": torch.zeros(rows, dtype=torch.long), "ref_logps": torch.zeros(rows, 2)}
    ids = torch.randint(0, V, (rows, seq_len + 1))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "doc_ids": torch.zeros(rows, seq_len, dtype=torch.long)}
    if kind == "distill":
        batch["teacher_ids"] = torch.randint(0, V, (rows, seq_len, k))
        batch["teacher_logprobs"] = torch.full((rows, seq_len, k), -5.0)
    return batch


def planning_loss(kind: str, stage_cfg: Any = None) -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], Any]:
    """The stage's objective as far as memory goes: the same model call and LM-head function. (Distillation's
    cache gather and the preference loss's (B, 2) arithmetic are not memory.)"""
    if kind == "lm":
        return lm_loss
    if kind == "distill":
        kd = stage_cfg.kd
        params = KDParams(method=kd.method, temperature=kd.temperature, weight=kd.weight,
                          weight_value=kd.weight_value, tau_squared=kd.tau_squared)

        def distill(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            head = partial(fused_head_loss, fn=ce_kd_chunk(params, kd.kd_weight),
                           inputs=[batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"]])
            return model(batch["input_ids"], doc_ids=batch["doc_ids"], head_fn=head)

        return distill
    if kind == "preference":
        def preference(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
            logps, _ = pair_logps(model, batch)
            return ((logps - batch["ref_logps"]).sum(),)

        return preference
    raise ValueError(f"no planning loss for batch kind {kind!r}; choose one of {sorted(set(STAGE_KINDS.values()))}")


def measure_step(cfg: DictConfig, config: LFM2Config, world_size: int, *, fake: bool = True) -> StepMemory:
    """Peak per-rank memory of an optimizer step of the training config `cfg` (stage, trainer,
    distributed, data.seq_len) for the model `config`, on fake tensors (any size) or real ones (tiny sizes)."""
    stage = cfg.stage.name
    if stage not in STAGE_KINDS:
        raise ValueError(f"stage {stage!r} does not train; plannable stages: {sorted(STAGE_KINDS)}")
    backend_kind = cfg.distributed.backend
    if backend_kind not in PLANNABLE_BACKENDS:
        raise ValueError(f"distributed.backend={backend_kind!r} cannot be planned (DeepSpeed owns its memory); "
                         f"plan with distributed=fsdp2 (ZeRO-3-like) or ddp instead")
    if backend_kind == "none" and world_size > 1:
        raise ValueError(f"distributed.backend=none runs one process; plan.gpus={world_size} needs ddp or fsdp2")
    # DDP's reducer cannot run on fake tensors; its memory is the single-process step plus the flat gradient
    # buckets it copies every gradient into (gradient_as_bucket_view=False, the default).
    wrapper = "none" if backend_kind == "ddp" else backend_kind
    run_cfg = OmegaConf.merge(cfg, {"trainer": {"compile": False}, "distributed": {"backend": wrapper}})
    t = run_cfg.trainer
    kind = STAGE_KINDS[stage]
    runtime = Runtime(rank=0, world_size=world_size, device=torch.device("cpu"))
    bf16 = t.precision == "bf16"
    with fake_world(world_size) if fake else nullcontext():
        backend = make_backend(LFM2ForCausalLM(config), run_cfg, runtime)
        tracker = _tracker(backend)
        batch = synthetic_batch(kind, config, t.micro_batch_size, run_cfg.data.seq_len,
                                int(run_cfg.stage.get("k", 32) or 32))
        loss_fn = planning_loss(kind, run_cfg.stage)
        autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16) if bf16 else nullcontext
        with tracker:
            # A step on zero gradients creates the optimizer state without a forward; the traced step is then
            # a whole accumulation with that state alive, which is where the steady-state peak lies.
            for p in backend.model.parameters():
                p.grad = torch.zeros_like(p)
            backend.step()
            backend.zero_grad()
            for i in range(t.grad_accum):
                tracker.reset_mod_stats()  # per-module stats cover one forward; the global peak stays
                with backend.sync_context(i == t.grad_accum - 1), autocast():
                    loss = loss_fn(backend.model, batch)[0]
                    backend.backward(loss * 1e-3)
            grads = [p for p in backend.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, max(float(run_cfg.optim.grad_clip), 1e-6))
            backend.step()
            backend.zero_grad()
        snapshot = tracker.get_tracker_snapshot("peak")
        params = backend.model.parameters()
        buckets = 0 if wrapper == backend_kind else sum(p.numel() * p.element_size() for p in params)
    memory = StepMemory.from_snapshot(snapshot[torch.device("cpu")])
    return replace(memory, grads=memory.grads + buckets, peak=memory.peak + buckets)


def _tracker(backend: Any) -> Any:
    """FSDPMemTracker understands sharded / gathered parameters; MemTracker the plain module."""
    if backend.kind == "fsdp2":
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = FSDPMemTracker(backend.model, backend.optimizer)
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(backend.model, backend.optimizer)
    return tracker
