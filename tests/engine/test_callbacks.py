"""The callback surface: every event, in order, on every step; and batch sources that bring their own loss
normaliser and token count (preference batches: pairs and real tokens, no dummy labels)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfm2_train.data.preference import PairStream, collate_pairs
from lfm2_train.engine.callbacks import Callback


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_step_start(self, trainer, step):
        self.events.append(f"start {step}")

    def on_before_optimizer_step(self, trainer):
        self.events.append("before optimizer")

    def on_step_end(self, trainer, step, metrics):
        self.events.append(f"end {step} {'skipped' if metrics is None else 'applied'}")

    def on_validation(self, trainer, metrics):
        self.events.append(f"validation {sorted(metrics)}")

    def on_checkpoint(self, trainer, path: Path):
        self.events.append(f"checkpoint {path.name}")

    def on_fit_end(self, trainer, summary):
        self.events.append(f"fit end {summary['status']}")


def test_events_arrive_in_order(tiny_trainer):
    rec = Recorder()
    trainer = tiny_trainer(None, "trainer.eval_every=2", "trainer.checkpoint_every=1", "trainer.resume=never",
                           "trainer.max_steps=3", "trainer.stop_after_steps=2", validate=True, callbacks=[rec])
    trainer.fit()
    assert rec.events == [
        "start 0", "before optimizer", "end 0 applied", "checkpoint step-00000001",
        "start 1", "before optimizer", "end 1 applied", "validation ['val_loss', 'val_ppl']",
        "checkpoint step-00000002", "fit end interrupted"]


def test_a_skipped_step_ends_without_an_optimizer_step(tiny_trainer):
    rec = Recorder()

    def nan_loss(model, batch):
        logits = model.head(model.embed(batch["input_ids"]))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        return loss * float("nan"), 0

    trainer = tiny_trainer(None, "trainer.max_nan_skips=5", loss_fn=nan_loss, callbacks=[rec])
    with pytest.warns(UserWarning, match="non-finite loss"):
        assert trainer.train_step() is None
    assert rec.events == ["start 0", "end 0 skipped"]


class PairsOfRandomTokens:
    """Preference-shaped batches; the normaliser and token count come from PairStream's rules."""

    normaliser = staticmethod(PairStream.normaliser)
    tokens = staticmethod(PairStream.tokens)

    def __init__(self) -> None:
        self.n = 0

    def next_batch(self, rows):
        from lfm2_train.data.preference import EncodedPair

        g = torch.Generator().manual_seed(self.n)
        self.n += 1
        pairs = [EncodedPair(prompt=(1, 2, 3), chosen=tuple(torch.randint(4, 16, (2 + i,), generator=g).tolist()),
                             rejected=tuple(torch.randint(4, 16, (3,), generator=g).tolist()), row=i)
                 for i in range(rows)]
        return collate_pairs(pairs, pad_id=0)

    @property
    def state(self):
        return self.n

    def load_state(self, state):
        self.n = state


def test_preference_batches_are_normalised_by_pairs_and_count_real_tokens(tiny_trainer):
    def pair_loss(model, batch):
        assert "labels" not in batch
        logits = model.head(model.embed(batch["input_ids"].flatten(0, 1)))
        per_row = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["targets"].flatten(0, 1),
                                                    reduction="none").sum(-1)
        return per_row.view(-1, 2).sum(), per_row.shape[0] // 2

    trainer = tiny_trainer(None, "trainer.grad_accum=1", train=PairsOfRandomTokens(), loss_fn=pair_loss)
    batch = PairsOfRandomTokens().next_batch(2)  # the batch the trainer is about to read
    with torch.no_grad():
        expected = pair_loss(trainer.job.model, batch)[0].item() / 2  # a mean over the 2 pairs of the step
    real = sum(3 + 2 + i + 3 + 3 for i in range(2))  # prompt + chosen, prompt + rejected, per pair
    metrics = trainer.train_step()
    assert metrics["tokens"] == real == int(PairStream.tokens(batch))
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
