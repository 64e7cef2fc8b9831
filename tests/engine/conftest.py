"""A trainer without a dataset or an LFM2 model: a bigram LM over random tokens, for tests of the loop itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from torch import nn

from lfm2_train.config import register_configs
from lfm2_train.engine.distributed import Runtime
from lfm2_train.engine.trainer import Trainer, TrainJob
from lfm2_train.model import get_preset


class TinyLM(nn.Module):
    """Just enough of LFM2ForCausalLM's surface for the trainer: a bigram model."""

    def __init__(self, vocab: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)
        self.config = get_preset("tiny")  # what checkpoints record; the export at the end is not used

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



@pytest.fixture
def tiny_trainer(tmp_path: Path) -> Callable[..., Trainer]:
    """tiny_trainer(runtime=None, *overrides, validate=False, **job_fields) -> a Trainer over TinyLM and Batches
    (`validate`: one validation batch)."""

    def make(runtime: Runtime | None = None, *overrides: str, validate: bool = False, **job_fields) -> Trainer:
        register_configs()
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name="lfm2_train", overrides=[
                "stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.micro_batch_size=2",
                "trainer.grad_accum=2", "trainer.max_steps=2", "threads=1", f"output_dir={tmp_path}", *overrides])
        fields = {"model": TinyLM(), "train": Batches(), "loss_fn": lm_loss,
                  "val_batches": [Batches().next_batch(2)] if validate else [], **job_fields}
        return Trainer(cfg, TrainJob(**fields), runtime or Runtime())

    return make
