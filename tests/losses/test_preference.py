"""Preference losses and per-sequence log-probs against naive float64 references (values and gradients)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lfm2_train.losses.preference import LOSSES, LossTerm, PreferenceLoss, pair_logps, sequence_logps


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _naive(name: str, pw: float, pl: float, rw: float, rl: float, lw: int, ll: int, beta: float, eps: float,
           gamma: float, ln: bool) -> tuple[float, float, float]:
    """(loss, d loss / d policy_w, d loss / d policy_l) for one pair, written out by hand in float64."""
    sw = 1.0 / lw if ln else 1.0
    sl = 1.0 / ll if ln else 1.0
    if name in ("simpo", "nll"):
        a, b = beta * pw * sw, beta * pl * sl
    else:
        a, b = beta * (pw - rw) * sw, beta * (pl - rl) * sl
    d = a - b
    if name in ("dpo", "ln_dpo", "simpo"):
        z = d - gamma if name == "simpo" else d
        loss = -(1 - eps) * math.log(_sig(z)) - eps * math.log(_sig(-z))
        dz = -(1 - eps) * _sig(-z) + eps * _sig(z)
        return loss, dz * beta * sw, -dz * beta * sl
    if name in ("apo_zero", "ln_apo_zero"):
        loss = 1 - _sig(a) + _sig(b)
        return loss, -_sig(a) * (1 - _sig(a)) * beta * sw, _sig(b) * (1 - _sig(b)) * beta * sl
    if name == "ipo":
        h = d / beta - 1 / (2 * beta)
        return h * h, 2 * h * sw, -2 * h * sl
    if name == "hinge":
        active = 1.0 if 1 - d > 0 else 0.0
        return max(0.0, 1 - d), -active * beta * sw, active * beta * sl
    if name == "nll":
        return -pw * sw, -sw, 0.0
    raise AssertionError(name)


def _inputs(seed: int = 0, B: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (B, 2), generator=g)
    policy = -torch.rand(B, 2, generator=g, dtype=torch.float64) * lengths * 2
    reference = policy + torch.randn(B, 2, generator=g, dtype=torch.float64) * 3
    return policy, reference, lengths


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("ln", [False, True])
def test_each_loss_and_gradient_equal_the_hand_written_reference(name, ln):
    if name in ("ln_dpo", "ln_apo_zero", "simpo") and not ln:
        ln_arg = None  # these are normalised by definition
        ln = True
    else:
        ln_arg = ln
    beta, eps, gamma = 0.7, (0.1 if name in ("dpo", "ln_dpo", "simpo") else 0.0), 0.3
    policy, reference, lengths = _inputs()
    policy.requires_grad_()
    loss_fn = PreferenceLoss((LossTerm(name, 1.0, ln_arg),), beta=beta, label_smoothing=eps, margin=gamma)
    per_pair, metrics = loss_fn(policy, reference, lengths)
    (per_pair * torch.arange(1, 7, dtype=torch.float64)).sum().backward()
    for i in range(policy.shape[0]):
        pw, pl = policy[i].tolist()
        rw, rl = reference[i].tolist()
        lw, ll = lengths[i].tolist()
        value, gw, gl = _naive(name, pw, pl, rw, rl, lw, ll, beta, eps, gamma, ln)
        assert per_pair[i].item() == pytest.approx(value, rel=1e-12, abs=1e-12)
        assert policy.grad[i, 0].item() == pytest.approx((i + 1) * gw, rel=1e-10, abs=1e-12)
        assert policy.grad[i, 1].item() == pytest.approx((i + 1) * gl, rel=1e-10, abs=1e-12)
    assert set(metrics) >= {"reward_chosen", "reward_rejected", "reward_margin", "accuracy"}


def test_length_normalisation_is_the_per_token_mean_log_ratio():
    # Hand-computed: chosen tokens log-ratios [-0.5, -1.0, -1.5] (mean -1.0); rejected [-2.0, -4.0] (mean -3.0).
    policy = torch.tensor([[-0.5 - 1.0 - 1.5, -2.0 - 4.0]], dtype=torch.float64)
    reference = torch.zeros_like(policy)
    lengths = torch.tensor([[3, 2]])
    _, m = PreferenceLoss((LossTerm("ln_dpo"),), beta=2.0)(policy, reference, lengths)
    assert m["reward_chosen"].item() == pytest.approx(2.0 * -1.0)
    assert m["reward_rejected"].item() == pytest.approx(2.0 * -3.0)
    assert m["reward_margin"].item() == pytest.approx(4.0) and m["accuracy"].item() == 1.0
    _, plain = PreferenceLoss((LossTerm("dpo"),), beta=2.0)(policy, reference, lengths)
    assert plain["reward_chosen"].item() == pytest.approx(-6.0) and plain["accuracy"].item() == 1.0
    # nll is not a reward: the reward metrics come from the first reward term
    _, mixed = PreferenceLoss((LossTerm("nll"), LossTerm("dpo")), beta=2.0)(policy, reference, lengths)
    assert mixed["reward_chosen"].item() == pytest.approx(-6.0)
    assert mixed["loss_nll"].item() == pytest.approx(3.0)


def test_weighted_sum_equals_the_sum_of_its_parts():
    policy, reference, lengths = _inputs(seed=3)
    terms = (LossTerm("ln_dpo", 0.6), LossTerm("apo_zero", 0.4, True), LossTerm("ipo", 0.25), LossTerm("hinge", 1.5),
             LossTerm("simpo", 0.1), LossTerm("nll", 0.3, True))
    mixed = PreferenceLoss(terms, beta=1.3, label_smoothing=0.05, margin=0.2)
    total, metrics = mixed(policy, reference, lengths)
    parts = sum(t.weight * PreferenceLoss((replace(t, weight=1.0),), 1.3, 0.05, 0.2)(policy, reference, lengths)[0]
                for t in terms)
    assert torch.allclose(total, parts, rtol=0, atol=1e-12)
    assert {"loss_ln_dpo", "loss_ln_apo_zero", "loss_ipo", "loss_hinge", "loss_simpo", "loss_ln_nll"} <= set(metrics)


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="unknown"):
        LossTerm("kto")
    with pytest.raises(ValueError, match="by definition"):
        LossTerm("ln_dpo", length_normalize=False)
    with pytest.raises(ValueError, match="name, weight"):
        PreferenceLoss.from_config([{"nme": "dpo"}], beta=1.0)
    with pytest.raises(ValueError, match="reference"):
        PreferenceLoss()(torch.zeros(2, 2), None, torch.ones(2, 2))
    assert not PreferenceLoss((LossTerm("simpo"), LossTerm("nll"))).needs_reference
    loss = PreferenceLoss.from_config([{"name": "dpo", "weight": 2, "length_normalize": True}], beta=5)
    assert loss.terms[0].normalised and loss.terms[0].label == "ln_dpo" and loss.beta == 5.0


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_sequence_logps_value_and_gradients_match_full_log_softmax(chunk):
    torch.manual_seed(0)
    R, T, d, V = 3, 7, 8, 20
    h = torch.randn(R, T, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (R, T))
    targets[0, :3] = -100
    targets[2, 5:] = -100
    lp, n = sequence_logps(h, w, targets, chunk_size=chunk)
    coeff = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    (lp * coeff).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    full = F.log_softmax(h2 @ w2.t(), -1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    ref = (full * (targets != -100)).sum(1)
    (ref * coeff).sum().backward()
    assert n.tolist() == [4, 7, 5]
    assert torch.allclose(lp, ref, atol=1e-12)
    assert torch.allclose(h.grad, h2.grad, atol=1e-12) and torch.allclose(w.grad, w2.grad, atol=1e-12)
    if chunk == 5:  # numerical Jacobian (slow): once is enough
        w_fixed = w2.detach()[:6, :3]
        assert torch.autograd.gradcheck(lambda a, b: sequence_logps(a, b, targets[1:3, 4:].remainder(6), chunk)[0],
                                        (h2.detach()[1:3, 4:, :3].clone().requires_grad_(), w_fixed.requires_grad_()))


def test_pair_logps_scores_padded_rows_like_unpadded_ones():
    from lfm2_train.model import LFM2ForCausalLM, get_preset

    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny")).double()
    seqs = [[1, 6, 20, 30, 7, 40, 41, 7], [1, 6, 20, 30, 7, 50, 7]]  # prompt of 5 tokens, completions 3 and 2
    T = 10
    ids = torch.zeros(1, 2, T, dtype=torch.long)
    doc = torch.full((1, 2, T), -1)
    tgt = torch.full((1, 2, T), -100)
    for j, s in enumerate(seqs):
        ids[0, j, :len(s)] = torch.tensor(s)
        doc[0, j, :len(s)] = 0
        tgt[0, j, 4:len(s) - 1] = torch.tensor(s[5:])
    lp, n = pair_logps(model, {"input_ids": ids, "doc_ids": doc, "targets": tgt})
    assert n.tolist() == [[3, 2]]
    for j, s in enumerate(seqs):
        logits = model(torch.tensor([s]))[0]
        want = F.log_softmax(logits[4:len(s) - 1], -1).gather(-1, torch.tensor(s[5:])[:, None]).sum()
        assert lp[0, j].item() == pytest.approx(want.item(), abs=1e-9)
