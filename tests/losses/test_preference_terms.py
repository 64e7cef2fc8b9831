"""The TRL-parity losses, f-divergence scores, LD-DPO split and NLL reductions against float64 hand references.

The formulas are written out per pair with `math` from TRL 1.16's `DPOTrainer._compute_loss`, independently of
`preference_terms.py`; gradients are checked against finite differences (`gradcheck`) and for finiteness.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lfm2_train.losses.preference import (
    ALL_LOSSES,
    TRL_LOSSES,
    LossTerm,
    PreferenceLoss,
    pair_logps,
    pair_logps_split,
)

NEW = ("robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_down", "discopop")


def _ls(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _cdpo(z: float, eps: float) -> float:
    return -(1 - eps) * _ls(z) - eps * _ls(-z)


def _naive(name: str, policy, reference, lengths, beta: float, eps: float, tau: float, ln: bool) -> list[float]:
    """Per-pair losses in float64, one pair at a time (the sorting losses sort Python lists)."""
    B = len(policy)
    scale = [[(1.0 / lengths[i][j] if ln else 1.0) for j in range(2)] for i in range(B)]
    rw = [beta * (policy[i][0] - reference[i][0]) * scale[i][0] for i in range(B)]
    rl = [beta * (policy[i][1] - reference[i][1]) * scale[i][1] for i in range(B)]
    if name == "aot":
        pol = sorted(beta * (policy[i][0] * scale[i][0] - policy[i][1] * scale[i][1]) for i in range(B))
        ref = sorted(beta * (reference[i][0] * scale[i][0] - reference[i][1] * scale[i][1]) for i in range(B))
        return [_cdpo(pol[i] - ref[i], eps) for i in range(B)]
    if name == "aot_unpaired":
        w, lo = sorted(rw), sorted(rl)
        return [_cdpo(w[i] - lo[i], eps) for i in range(B)]
    out = []
    for a, b in zip(rw, rl, strict=True):
        d = a - b
        if name == "robust":
            out.append((-(1 - eps) * _ls(d) + eps * _ls(-d)) / (1 - 2 * eps))
        elif name == "exo_pair":
            out.append(_sig(d) * (_ls(d) - math.log(1 - eps)) + _sig(-d) * (_ls(-d) - math.log(eps)))
        elif name == "nca_pair":
            out.append(-_ls(a) - 0.5 * _ls(-a) - 0.5 * _ls(-b))
        elif name == "bco_pair":
            out.append(-_ls(a) - _ls(-b))
        elif name == "sppo_hard":
            out.append((a / beta - 0.5 / beta) ** 2 + (b / beta + 0.5 / beta) ** 2)
        elif name == "apo_down":
            out.append(_sig(a) + 1 - _sig(d))
        elif name == "discopop":
            m = _sig(d / tau)
            out.append(-(1 - m) * _ls(d) + m * math.exp(-d))
        else:
            raise AssertionError(name)
    return out


def _inputs(seed: int = 0, B: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 30, (B, 2), generator=g)
    policy = -torch.rand(B, 2, generator=g, dtype=torch.float64) * lengths * 2
    reference = policy + torch.randn(B, 2, generator=g, dtype=torch.float64) * 3
    return policy, reference, lengths


@pytest.mark.parametrize("ln", [False, True])
@pytest.mark.parametrize("name", NEW)
def test_each_new_loss_equals_the_hand_written_reference_and_has_finite_gradients(name, ln):
    beta, eps, tau = 0.4, 0.1, 0.3
    policy, reference, lengths = _inputs()
    loss = PreferenceLoss((LossTerm(name, 1.0, ln),), beta=beta, label_smoothing=eps, discopop_tau=tau)
    per_pair, metrics = loss(policy, reference, lengths)
    want = _naive(name, policy.tolist(), reference.tolist(), lengths.tolist(), beta, eps, tau, ln)
    assert per_pair.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert metrics[f"loss_{'ln_' if ln else ''}{name}"].item() == pytest.approx(sum(want), rel=1e-12)
    p = policy.clone().requires_grad_()
    r = reference.clone().requires_grad_()
    (loss(p, r, lengths)[0] * torch.arange(1, 7, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(r.grad).all() and p.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, lengths[:4])[0], (policy[:4].clone().requires_grad_(),
                                                                           reference[:4].clone().requires_grad_()))


def test_trl_aliases_compute_the_same_as_this_projects_names():
    policy, reference, lengths = _inputs(seed=1)
    for alias, base in (("sigmoid", "dpo"), ("sigmoid_norm", "ln_dpo"), ("sft", "nll")):
        a = PreferenceLoss((LossTerm(alias),), beta=0.7, label_smoothing=0.1)(policy, reference, lengths)
        b = PreferenceLoss((LossTerm(base),), beta=0.7, label_smoothing=0.1)(policy, reference, lengths)
        assert torch.equal(a[0], b[0]) and f"loss_{alias}" in a[1]
    assert set(TRL_LOSSES) <= set(ALL_LOSSES) and not PreferenceLoss((LossTerm("sft"),)).needs_reference


@pytest.mark.parametrize("kind,coef", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3),
                                       ("alpha_divergence", 1.0)])
def test_f_divergence_rewards_are_beta_f_prime_of_the_ratio(kind, coef):
    policy, reference, lengths = _inputs(seed=2)
    beta = 0.8
    _, m = PreferenceLoss((LossTerm("sigmoid_norm"),), beta=beta, f_divergence_type=kind,
                          f_alpha_divergence_coef=coef)(policy, reference, lengths)

    def f_prime(u: float) -> float:
        if kind == "forward_kl":
            return 1 - math.exp(-u)
        if kind == "js_divergence":
            return math.log(2) + _ls(u)
        return u if coef == 1.0 else (math.exp((coef - 1) * u) - 1) / (coef - 1)

    u = (policy - reference).tolist()
    want = sum(beta * f_prime(u[i][0]) / int(lengths[i, 0]) for i in range(len(u)))
    assert m["reward_chosen"].item() == pytest.approx(want, rel=1e-12)


def test_ld_alpha_reweights_the_tail_and_leaves_the_nll_alone():
    policy, reference, lengths = _inputs(seed=3)
    tails_p = torch.where(lengths == lengths.max(1, keepdim=True).values, 0.3 * policy, torch.zeros_like(policy))
    tails_r = torch.where(lengths == lengths.max(1, keepdim=True).values, 0.3 * reference, torch.zeros_like(policy))
    alpha, beta = 0.25, 0.5
    per_pair, _ = PreferenceLoss((LossTerm("sigmoid"), LossTerm("sft")), beta=beta, ld_alpha=alpha)(
        policy, reference, lengths, tails_p, tails_r)
    for i in range(policy.shape[0]):
        lp = [policy[i, j].item() - (1 - alpha) * tails_p[i, j].item() for j in range(2)]
        lr = [reference[i, j].item() - (1 - alpha) * tails_r[i, j].item() for j in range(2)]
        want = -_ls(beta * ((lp[0] - lr[0]) - (lp[1] - lr[1]))) - policy[i, 0].item()
        assert per_pair[i].item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="tail"):
        PreferenceLoss((LossTerm("dpo"),), ld_alpha=0.5)(policy, reference, lengths)
    same = PreferenceLoss((LossTerm("dpo"),), ld_alpha=1.0)(policy, reference, lengths, tails_p, tails_r)[0]
    assert torch.allclose(same, PreferenceLoss((LossTerm("dpo"),))(policy, reference, lengths)[0], atol=1e-14)


def test_token_reduction_is_the_chosen_tokens_mean_over_the_call():
    policy, reference, lengths = _inputs(seed=4)
    per_pair, m = PreferenceLoss((LossTerm("nll"),), nll_reduction="token")(policy, None, lengths)
    want = -policy[:, 0].sum().item() / lengths[:, 0].sum().item()
    assert per_pair.mean().item() == pytest.approx(want, rel=1e-12)
    assert m["loss_nll"].item() / policy.shape[0] == pytest.approx(want, rel=1e-12)
    pair = PreferenceLoss((LossTerm("nll", 1.0, True),))(policy, None, lengths)[0].mean().item()
    assert pair == pytest.approx((-policy[:, 0] / lengths[:, 0]).mean().item(), rel=1e-12)
    assert abs(pair - want) > 1e-3  # the two conventions disagree whenever lengths differ


def test_pair_logps_split_tails_are_the_tokens_past_the_shorter_response():
    from lfm2_train.model import LFM2ForCausalLM, get_preset

    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny")).double()
    pairs = [([1, 6, 20, 30, 7], [40, 41, 42, 7], [50, 7]), ([1, 6, 21], [60, 7], [61, 62, 63, 64, 7]),
             ([1, 5], [70, 7], [71, 7])]
    T = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    ids = torch.zeros(len(pairs), 2, T, dtype=torch.long)
    doc = torch.full((len(pairs), 2, T), -1)
    tgt = torch.full((len(pairs), 2, T), -100)
    for b, (prompt, *responses) in enumerate(pairs):
        for j, resp in enumerate(responses):
            s = prompt + resp
            ids[b, j, :len(s)] = torch.tensor(s)
            doc[b, j, :len(s)] = 0
            tgt[b, j, len(prompt) - 1:len(s) - 1] = torch.tensor(resp)
    batch = {"input_ids": ids, "doc_ids": doc, "targets": tgt}
    sums, lengths, tails = pair_logps_split(model, batch, chunk_size=3)
    plain, plain_lengths = pair_logps(model, batch)
    assert torch.allclose(sums, plain, atol=1e-12) and torch.equal(lengths, plain_lengths)
    for b, (prompt, *responses) in enumerate(pairs):
        shared = min(len(r) for r in responses)
        for j, resp in enumerate(responses):
            logits = model(torch.tensor([prompt + resp]))[0]
            lp = F.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, torch.tensor(resp)[:, None]).squeeze(1)
            assert tails[b, j].item() == pytest.approx(lp[shared:].sum().item(), abs=1e-10)
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[-100, 3, 4, 5, 6], [-100, -100, 1, 2, -100]])
    from lfm2_train.losses.preference import sequence_logps_split

    assert torch.autograd.gradcheck(
        lambda a, b: torch.cat(sequence_logps_split(a, b, t, torch.tensor([2, 1]), 2)[::2]), (h, w))


def test_bad_trl_options_are_named():
    with pytest.raises(ValueError, match="label_smoothing > 0"):
        PreferenceLoss((LossTerm("exo_pair"),))
    with pytest.raises(ValueError, match="no f-divergence form"):
        PreferenceLoss((LossTerm("apo_zero"),), f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="f_divergence_type"):
        PreferenceLoss(f_divergence_type="kl")
    with pytest.raises(ValueError, match="ld_alpha"):
        PreferenceLoss(ld_alpha=1.5)
    with pytest.raises(ValueError, match="per-token mean"):
        PreferenceLoss((LossTerm("nll", 1.0, True),), nll_reduction="token")
    with pytest.raises(ValueError, match="conventions"):
        PreferenceLoss(conventions="trl")
    with pytest.raises(ValueError, match="nll_reduction"):
        PreferenceLoss(nll_reduction="sum")
    with pytest.raises(ValueError, match="by definition"):
        LossTerm("sigmoid_norm", length_normalize=False)
    loss = PreferenceLoss.from_config([{"name": "ipo"}], beta=0.1, conventions="trl_compatible", nll_reduction=None,
                                      ld_alpha=None, f_divergence_type=None, discopop_tau=None)
    assert loss.terms[0].label == "ln_ipo" and loss.nll_reduction == "token" and loss.discopop_tau == 0.05
