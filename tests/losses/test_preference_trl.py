"""Parity with TRL 1.16: every TRL loss name, under `conventions="trl_compatible"`, against TRL's own code.

TRL's `DPOTrainer._compute_loss` and CPO's `cpo_loss` run on the same made-up per-token log-probs
(`trl_reference.py`); nothing is downloaded or trained. The engine's loss is the mean over pairs of the
per-pair values, which is what TRL's scalar is.
"""

from __future__ import annotations

import pytest
import torch

from lfm2_train.losses.preference import LossTerm, PreferenceLoss

trl_reference = pytest.importorskip("tests.losses.trl_reference")
pytest.importorskip("trl")

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
    want = trl_reference.trl_dpo_loss(*trl_inputs, loss_type=[name], **options)
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
    want = trl_reference.trl_dpo_loss(*trl_inputs, loss_type=[name], **options)
    got = _ours([name], [1.0], ours_inputs, **options)
    assert got.item() == pytest.approx(want.item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("names,weights", [(["sigmoid", "sft"], [1.0, 0.7]),  # RPO
                                           (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
                                           (["ipo", "apo_down", "aot"], [0.5, 1.0, 2.0])])
def test_weighted_mixtures_match_trl(names, weights):
    trl_inputs, ours_inputs = _batch(seed=2)
    options = dict(beta=0.2, label_smoothing=0.1, ld_alpha=0.7)
    want = trl_reference.trl_dpo_loss(*trl_inputs, loss_type=names, loss_weights=weights, **options)
    got = _ours(names, weights, ours_inputs, **options)
    assert got.item() == pytest.approx(want.item(), rel=1e-9, abs=1e-9)


def test_simpo_plus_nll_matches_cpo_under_trl_conventions_only():
    """SimPO + cpo_alpha * NLL: CPO's NLL is the chosen tokens' mean over the batch (nll_reduction=token)."""
    (pol, ref, mask), (policy, _, lengths, _, _) = _batch(seed=3)
    B = policy.shape[0]
    beta, gamma, eps, cpo_alpha = 2.0, 0.5, 0.05, 1.0
    mean_logps = policy / lengths
    simpo = trl_reference.trl_simpo_loss(mean_logps[:, 0], mean_logps[:, 1], beta=beta, simpo_gamma=gamma,
                                         label_smoothing=eps)
    token_nll = trl_reference.trl_dpo_loss(pol, ref, mask, loss_type=["sft"])
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
    ipo_trl = trl_reference.trl_dpo_loss(*trl_inputs, loss_type=["ipo"], beta=0.3).item()
    sigmoid_trl = trl_reference.trl_dpo_loss(*trl_inputs, loss_type=["sigmoid"], beta=0.3).item()

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
