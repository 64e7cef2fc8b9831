"""The trainer's bookkeeping collectives only ever see tensors on the run's device.

NCCL reduces CUDA tensors and nothing else, so a loss sum kept on the CPU fails the first step of a multi-GPU
run — and no gloo test can notice, because gloo reduces CPU tensors happily. Here the run's device is `lazy`
(PyTorch's lazy-tensor device, which computes on the CPU but is not `cpu`), and the process group is a
one-rank stand-in that behaves like NCCL: it refuses any tensor that is not on its device. Every collective
the trainer makes in a step, a validation, a checkpoint decision and an MoE-style callback goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize
from torch import nn

from lfm2_train.config import register_configs
from lfm2_train.engine.callbacks import Callback
from lfm2_train.engine.distributed import Runtime
from lfm2_train.engine.trainer import Trainer, TrainJob

lazy = pytest.importorskip("torch._lazy.ts_backend")


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


class TinyLM(nn.Module):
    """Just enough of LFM2ForCausalLM's surface for the trainer: a bigram model."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)
        self.config = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[nn.Module]:
        return []

    def update_expert_biases(self) -> list[torch.Tensor]:
        return []


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]):
    logits = model.head(model.embed(batch["input_ids"]))
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    return loss, (batch["labels"] != -100).sum(), {"ce": loss.detach()}


class Batches:
    def __init__(self) -> None:
        self.n = 0

    def next_batch(self, rows: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.n)
        self.n += 1
        ids = torch.randint(0, 16, (rows, 9), generator=g)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    @property
    def state(self) -> int:
        return self.n

    def load_state(self, state: int) -> None:
        self.n = state


class AllReduceEveryStep(Callback):
    """Like the MoE bias update: a callback that reduces a device buffer after every step."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float] | None) -> None:
        trainer.runtime.all_reduce_sum(torch.ones(3, device=trainer.runtime.device))


def test_every_bookkeeping_collective_is_on_the_device(tmp_path: Path) -> None:
    lazy.init()
    runtime = NcclLikeRuntime(device=torch.device("lazy"))
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=[
            "stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.micro_batch_size=2",
            "trainer.grad_accum=2", "trainer.max_steps=2", "threads=1", f"output_dir={tmp_path}"])
    job = TrainJob(model=TinyLM(), train=Batches(), loss_fn=lm_loss, val_batches=[Batches().next_batch(2)],
                   callbacks=[AllReduceEveryStep()])
    trainer = Trainer(cfg, job, runtime)
    trainer.backend.model.train()
    for _ in range(2):
        metrics = trainer.train_step()
        trainer.step += 1
        assert metrics is not None and metrics["tokens"] == 2 * 2 * 8
    assert trainer.evaluate()["val_loss"] > 0
    assert runtime.seen and set(runtime.seen) == {"lazy"}
