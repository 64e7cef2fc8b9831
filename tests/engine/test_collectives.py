"""The trainer's bookkeeping collectives only ever see tensors on the run's device.

NCCL reduces CUDA tensors and nothing else, so a loss sum kept on the CPU fails the first step of a multi-GPU
run — and no gloo test can notice, because gloo reduces CPU tensors happily. Here the run's device is `lazy`
(PyTorch's lazy-tensor device, which computes on the CPU but is not `cpu`), and the process group is a
one-rank stand-in that behaves like NCCL: it refuses any tensor that is not on its device. Every collective
the trainer makes in a step, a validation, a checkpoint decision and an MoE-style callback goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lfm2_train.engine.callbacks import Callback
from lfm2_train.engine.distributed import Runtime
from lfm2_train.engine.trainer import Trainer

lazy = pytest.importorskip("torch._lazy.ts_backend")


@pytest.fixture(scope="module")
def lazy_device() -> torch.device:
    """The lazy device (its backend may be initialised once per process)."""
    lazy.init()
    return torch.device("lazy")


@dataclass
class NcclLikeRuntime(Runtime):
    """One rank that takes the distributed code paths; its 'group' reduces tensors on `device` only."""

    seen: list[str] = field(default_factory=list)

    @property
    def distributed(self) -> bool:
        return True

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != self.device.type:
            raise RuntimeError(f"the group's backend for {self.device.type} cannot reduce a tensor on {t.device}")
        self.seen.append(t.device.type)
        return t.clone()

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any) -> Any:
        return obj


class AllReduceEveryStep(Callback):
    """Like the MoE bias update: a callback that reduces a device buffer after every step."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float] | None) -> None:
        trainer.runtime.all_reduce_sum(torch.ones(3, device=trainer.runtime.device))


def test_every_bookkeeping_collective_is_on_the_device(tiny_trainer, lazy_device) -> None:
    runtime = NcclLikeRuntime(device=lazy_device)
    trainer = tiny_trainer(runtime, "trainer.eval_every=1", validate=True, callbacks=[AllReduceEveryStep()])
    trainer.backend.model.train()
    for _ in range(2):
        metrics = trainer.train_step()
        trainer.step += 1
        assert metrics is not None and metrics["tokens"] == 2 * 2 * 8
    assert trainer.evaluate()["val_loss"] > 0
    assert runtime.seen and set(runtime.seen) == {"lazy"}


class HostReads(TorchFunctionMode):
    """Records every read of a device tensor's value by the host (what would block on a GPU)."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        on_device = isinstance(first, torch.Tensor) and first.device.type != "cpu"
        to_host = name == "to" and any(str(a) == "cpu" for a in (*args[1:], *(kwargs or {}).values()))
        if on_device and (name in self.READS or to_host):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_step(tiny_trainer, lazy_device) -> None:
    """Loss and metric sums, counts, the gradient norm and the stop flag reach the host in one read per step."""
    runtime = NcclLikeRuntime(device=lazy_device)
    trainer = tiny_trainer(runtime, callbacks=[AllReduceEveryStep()])
    trainer.backend.model.train()
    for _ in range(2):
        with HostReads() as mode:
            assert trainer.train_step() is not None
        trainer.step += 1
        assert mode.reads == ["tolist"]
