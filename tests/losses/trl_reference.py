"""TRL's own loss code run on made-up per-token log-probs: the reference for the parity tests.

`trl_dpo_loss` calls `trl.DPOTrainer._compute_loss` (TRL 1.16) on a trainer object built without `__init__`:
only the attributes the loss reads are set, and the policy and reference "models" return given per-token
log-probs instead of running a network. So the numbers are TRL's arithmetic, including its LD-DPO split and
its token-level `sft` mean, with nothing downloaded and nothing trained. `trl_simpo_loss` does the same for
CPO's SimPO (`trl.experimental.cpo.CPOTrainer.cpo_loss`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from types import SimpleNamespace

import torch


class _FakeModel(torch.nn.Module):
    """Stands in for a causal LM with TRL's fused head: returns the given per-token log-probs (2B, T - 1)."""

    is_gradient_checkpointing = False

    def __init__(self, per_token: torch.Tensor) -> None:
        super().__init__()
        self.per_token = per_token

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(self.per_token, dtype=torch.bool))


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    @staticmethod
    def autocast() -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def trl_dpo_loss(policy_tokens: torch.Tensor, reference_tokens: torch.Tensor, completion_mask: torch.Tensor, *,
                 loss_type: list[str], loss_weights: list[float] | None = None, beta: float = 0.1,
                 label_smoothing: float = 0.0, ld_alpha: float | None = None, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05) -> torch.Tensor:
    """TRL's DPO loss (a scalar: the mean over pairs of the weighted terms).

    policy_tokens / reference_tokens (2B, T - 1): log p of token t + 1 at position t, zero off the completion;
    completion_mask (2B, T); rows 0..B-1 are the chosen responses, B..2B-1 the rejected ones (TRL's layout).
    """
    from trl import DPOTrainer

    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.accelerator = _Accelerator()
    trainer.model = _FakeModel(policy_tokens)
    trainer.ref_model = _FakeModel(reference_tokens)
    trainer.precompute_ref_logps = False
    trainer.aux_loss_enabled = False
    trainer.beta = beta
    trainer.loss_types = list(loss_type)
    trainer.loss_weights = list(loss_weights or [1.0] * len(loss_type))
    trainer.ld_alpha = ld_alpha
    trainer.f_divergence_type = f_divergence_type
    trainer.f_alpha_divergence_coef = f_alpha_divergence_coef
    trainer.label_smoothing = label_smoothing
    trainer.use_weighting = False
    trainer.args = SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    inputs = {"input_ids": torch.zeros(completion_mask.shape, dtype=torch.long),
              "attention_mask": torch.ones_like(completion_mask), "completion_mask": completion_mask}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer._compute_loss(trainer.model, inputs, return_outputs=False)


def trl_simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, *, beta: float,
                   simpo_gamma: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """CPO's SimPO term per pair, on per-token-averaged policy log-probs (CPO averages them for simpo)."""
    from trl.experimental.cpo import CPOTrainer

    trainer = CPOTrainer.__new__(CPOTrainer)
    trainer.accelerator = _Accelerator()
    trainer.alpha = 0.0
    trainer.beta = beta
    trainer.loss_type = "simpo"
    trainer.simpo_gamma = simpo_gamma
    trainer.label_smoothing = label_smoothing
    losses, _, _ = trainer.cpo_loss(chosen_mean_logps, rejected_mean_logps)
    return losses
