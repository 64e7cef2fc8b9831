"""Parity with TRL 1.16: every TRL loss name, under `conventions="trl_compatible"`, against TRL's own code.

`trl_dpo_loss` calls `trl.DPOTrainer._compute_loss` on a trainer object built without `__init__`: only the
attributes the loss reads are set, and the policy and reference "models" return given per-token log-probs
instead of running a network. So the reference numbers are TRL's arithmetic, including its LD-DPO split and
its token-level `sft` mean, with nothing downloaded and nothing trained. `trl_simpo_loss` does the same for
CPO's SimPO (`trl.experimental.cpo.CPOTrainer.cpo_loss`). The engine's loss is the mean over pairs of the
per-pair values, which is what TRL's scalar is.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lfm2_train.losses.preference import LossTerm, PreferenceLoss

pytest.importorskip("trl")


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


TRL_NAMES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
             "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft")
F_DIVERGENCE_NAMES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def _batch(seed: int = 0, B: int = 6, T: int = 26, dtype: torch.dtype = torch.float64):
    """Per-token log-probs in TRL's layout and the same data as this project's (B, 2) sums.

    -> (policy_tokens, reference_tokens, completion_mask) for TRL; (policy, reference, lengths, policy_tail,
    reference_tail) for PreferenceLoss, the tails summed by hand past the shorter response's length.
    """
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    lengths = torch.zeros(B, 2, dtype=torch.long)
    for i in range(B):
        for j in range(2):
            prompt = int(torch.randint(1, 6, (1,), generator=g))
            n = int(torch.randint(1, T - prompt, (1,), generator=g)) if (i, j) != (0, 1) else int(lengths[0, 0])
            mask[j * B + i, prompt:prompt + n] = 1  # pair 0 has equal lengths: no tail at all
            lengths[i, j] = n
    shift = mask[:, 1:].to(dtype)
    pol = -torch.rand(2 * B, T - 1, generator=g, dtype=dtype) * 2.0 * shift
    ref = (pol + 0.25 * torch.randn(2 * B, T - 1, generator=g, dtype=dtype)) * shift

    def per_pair(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = torch.zeros(B, 2, dtype=dtype)
        tails = torch.zeros(B, 2, dtype=dtype)
        for i in range(B):
            shared = int(lengths[i].min())
            for j in range(2):
                values = tokens[j * B + i][shift[j * B + i].bool()]
                sums[i, j] = values.sum()
                tails[i, j] = values[shared:].sum()
        return sums, tails

    policy, policy_tail = per_pair(pol)
    reference, reference_tail = per_pair(ref)
    return (pol, ref, mask), (policy, reference, lengths, policy_tail, reference_tail)


def _ours(names, weights, ours_inputs, **options) -> torch.Tensor:
    policy, reference, lengths, policy_tail, reference_tail = ours_inputs
    loss = PreferenceLoss(tuple(LossTerm(n, w) for n, w in zip(names, weights, strict=True)),
                          conventions=options.pop("conventions", "trl_compatible"), **options)
    per_pair, _ = loss(policy, reference, lengths, policy_tail, reference_tail)
    return per_pair.mean()


@pytest.mark.parametrize("ld_alpha", [None, 0.4])
@pytest.mark.parametrize("name", TRL_NAMES)
def test_each_trl_name_matches_trl(name, ld_alpha):
    trl_inputs, ours_inputs = _batch()
    # label_smoothing 0.1 everywhere: TRL reads it only in robust, exo_pair and aot*, and the preset agrees
    options = dict(beta=0.3, label_smoothing=0.1, ld_alpha=ld_alpha, discopop_tau=0.07)
    want = trl_dpo_loss(*trl_inputs, loss_type=[name], **options)
    got = _ours([name], [1.0], ours_inputs, **options)
    tol = 1e-7 if name == "exo_pair" else 1e-9  # TRL takes log(eps) of a float32 tensor, ~1e-8 off in float64
    assert got.item() == pytest.approx(want.item(), rel=tol, abs=tol)


@pytest.mark.parametrize("kind,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                                       ("alpha_divergence", 1.7), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("name", F_DIVERGENCE_NAMES)
def test_f_divergences_match_trl(name, kind, coef):
    # TRL's alpha-divergence only accepts fp16 / bf16 / fp32 scores, so this comparison runs in fp32
    trl_inputs, ours_inputs = _batch(seed=1, dtype=torch.float32)
    options = dict(beta=0.5, label_smoothing=0.05, f_divergence_type=kind, f_alpha_divergence_coef=coef)
    want = trl_dpo_loss(*trl_inputs, loss_type=[name], **options)
    got = _ours([name], [1.0], ours_inputs, **options)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("names,weights", [(["sigmoid", "sft"], [1.0, 0.7]),  # RPO
                                           (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
                                           (["ipo", "apo_down", "aot"], [0.5, 1.0, 2.0])])
def test_weighted_mixtures_match_trl(names, weights):
    trl_inputs, ours_inputs = _batch(seed=2)
    options = dict(beta=0.2, label_smoothing=0.1, ld_alpha=0.7)
    want = trl_dpo_loss(*trl_inputs, loss_type=names, loss_weights=weights, **options)
    got = _ours(names, weights, ours_inputs, **options)
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-9)


def test_simpo_plus_nll_matches_cpo_under_trl_conventions_only():
    """SimPO + cpo_alpha * NLL: CPO's NLL is the chosen tokens' mean over the batch (nll_reduction=token)."""
    (pol, ref, mask), (policy, _, lengths, _, _) = _batch(seed=3)
    B = policy.shape[0]
    beta, gamma, eps, cpo_alpha = 2.0, 0.5, 0.05, 1.0
    mean_logps = policy / lengths
    simpo = trl_simpo_loss(mean_logps[:, 0], mean_logps[:, 1], beta=beta, simpo_gamma=gamma,
                                         label_smoothing=eps)
    token_nll = trl_dpo_loss(pol, ref, mask, loss_type=["sft"])
    want = simpo.mean() + cpo_alpha * token_nll
    terms = (LossTerm("simpo"), LossTerm("nll", cpo_alpha))
    trl = PreferenceLoss(terms, beta, eps, gamma, conventions="trl_compatible")(policy, None, lengths)[0].mean()
    assert trl.item() == pytest.approx(want.item(), rel=1e-12)
    explicit = PreferenceLoss(terms, beta, eps, gamma, nll_reduction="token")(policy, None, lengths)[0].mean()
    assert explicit.item() == pytest.approx(want.item(), rel=1e-12)
    native = PreferenceLoss(terms, beta, eps, gamma)(policy, None, lengths)[0].mean()  # per-pair mean of sums
    assert native.item() == pytest.approx((simpo.mean() - cpo_alpha * policy[:, 0].mean()).item(), rel=1e-12)
    assert abs(native.item() - want.item()) > 1e-3
    assert token_nll.item() == pytest.approx((-policy[:, 0].sum() / lengths[:, 0].sum()).item(), rel=1e-12)
    assert B == mean_logps.shape[0]


def test_conventions_differ_exactly_where_documented():
    trl_inputs, ours_inputs = _batch(seed=4)
    policy, reference, lengths, _, _ = ours_inputs
    ipo_trl = trl_dpo_loss(*trl_inputs, loss_type=["ipo"], beta=0.3).item()
    sigmoid_trl = trl_dpo_loss(*trl_inputs, loss_type=["sigmoid"], beta=0.3).item()

    def mean(terms, **kw):
        return PreferenceLoss(terms, beta=0.3, **kw)(policy, reference, lengths)[0].mean().item()

    # IPO: summed natively, token-averaged under trl_compatible or with length_normalize=true
    assert mean((LossTerm("ipo", 1.0, True),)) == pytest.approx(ipo_trl, rel=1e-12)
    assert mean((LossTerm("ipo"),), conventions="trl_compatible") == pytest.approx(ipo_trl, rel=1e-12)
    assert abs(mean((LossTerm("ipo"),)) - ipo_trl) > 1e-3
    assert mean((LossTerm("ipo", 1.0, False),), conventions="trl_compatible") == pytest.approx(
        mean((LossTerm("ipo"),)), rel=1e-12)
    # DPO with label smoothing: cDPO natively, ignored by TRL 1.16's sigmoid (and so under trl_compatible)
    assert mean((LossTerm("dpo"),), label_smoothing=0.2, conventions="trl_compatible") == pytest.approx(
        sigmoid_trl, rel=1e-12)
    assert abs(mean((LossTerm("sigmoid"),), label_smoothing=0.2) - sigmoid_trl) > 1e-3
    assert mean((LossTerm("sigmoid"),)) == pytest.approx(sigmoid_trl, rel=1e-12)
    # an explicit nll_reduction wins over the preset
    assert mean((LossTerm("sft"),), conventions="trl_compatible", nll_reduction="pair") == pytest.approx(
        -policy[:, 0].mean().item(), rel=1e-12)
    loss = PreferenceLoss((LossTerm("ipo"), LossTerm("nll")), conventions="trl_compatible")
    assert loss.terms[0].normalised and loss.nll_reduction == "token"
    assert PreferenceLoss().nll_reduction == "pair" and not PreferenceLoss((LossTerm("ipo"),)).terms[0].normalised
