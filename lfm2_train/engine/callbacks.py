"""What a stage (or the engine itself) can hook into the training loop, without editing it.

A callback subclasses `Callback` and overrides only the events it needs; the trainer calls every callback of
`TrainJob.callbacks` in list order, after its own built-in ones. The events, in the order one step sees them:

- `on_step_start(trainer, step)`: before the step reads its batches (schedules of loss weights, temperatures);
- `on_before_optimizer_step(trainer)`: gradients are reduced and clipped, the step is going to be applied;
- `on_step_end(trainer, step, metrics)`: after the update (`metrics` is None when the step was skipped
  because its loss or gradient norm was not finite);
- `on_validation(trainer, metrics)`, `on_checkpoint(trainer, path)`, `on_fit_end(trainer, summary)`.

Callbacks run on every rank. Anything collective they do (an all-reduce) must be done by all ranks at the same
event, which holds as long as a callback's decisions depend only on values that are equal on all ranks (the
step number, the logged metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """No-op base: override the events you need."""

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        pass

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float] | None) -> None:
        pass

    def on_validation(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        pass

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        pass


class ExpertBiasUpdate(Callback):
    """Aux-loss-free MoE balancing after every applied optimizer step: the per-rank expert loads are summed
    over ranks first (on the device, no host sync), so every rank applies the same bias update."""

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, float] | None) -> None:
        if metrics is None:  # a skipped step: its counts stay and join the next step's, as the update never ran
            return
        model = trainer.job.model
        for moe in model.moe_layers():
            moe.expert_load.copy_(trainer.runtime.all_reduce_sum(moe.expert_load))
        model.update_expert_biases()
