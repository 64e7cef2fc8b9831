"""Decoupled Top-K KD: identities, a naive float64 reference, baselines, and chunked == unchunked."""

from __future__ import annotations

import math

import pytest
import torch

from lfm2_train.losses.distill import KDParams, ce_kd_chunk, kd_terms
from lfm2_train.losses.head import fused_head_loss


@pytest.fixture(autouse=True)
def _float64():
    """The identities are checked in float64; restore the default so other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _teacher(n: int, V: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    t_lp = t_logits.log_softmax(-1)
    lp, ids = t_lp.topk(K, dim=-1)
    return t_logits, ids, lp


def _naive(z_row, ids_row, lp_row, tau, weight, weight_value, tau_sq):
    """Straight from the formula, one position, float64, Python loops."""
    V = z_row.numel()
    q = [math.exp(z_row[v].item() - torch.logsumexp(z_row, 0).item()) for v in range(V)]
    T = ids_row.tolist()
    p = [math.exp(x) for x in lp_row.tolist()]
    PT, QT = sum(p), sum(q[v] for v in T)
    mass = PT * math.log(PT / QT) + ((1 - PT) * math.log((1 - PT) / (1 - QT)) if PT < 1 else 0.0)
    pz = [x / tau for x in lp_row.tolist()]
    qz = [z_row[v].item() / tau for v in T]
    lse_p, lse_q = math.log(sum(math.exp(x) for x in pz)), math.log(sum(math.exp(x) for x in qz))
    cond = sum(math.exp(a - lse_p) * ((a - lse_p) - (b - lse_q)) for a, b in zip(pz, qz))
    w = {"teacher_mass": PT, "one": 1.0, "constant": weight_value}[weight]
    return mass + w * cond * (tau * tau if tau_sq else 1.0)


def test_full_support_at_tau_one_equals_the_full_kl():
    t_logits, ids, lp = _teacher(6, 30, 30)
    z = torch.randn(6, 30)
    terms = kd_terms(z, ids, lp, KDParams(temperature=1.0, weight="teacher_mass"))
    full_kl = (t_logits.softmax(-1) * (t_logits.log_softmax(-1) - z.log_softmax(-1))).sum(-1)
    assert torch.allclose(terms["kd"], full_kl, atol=1e-10, rtol=0)
    tail = kd_terms(z, ids, lp, KDParams(method="tail_bucket"))
    assert torch.allclose(tail["kd"], full_kl, atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("weight", ["teacher_mass", "one", "constant"])
def test_zero_loss_and_zero_gradient_when_student_equals_teacher(tau, weight):
    t_logits, ids, lp = _teacher(5, 40, 8)
    z = t_logits.clone().requires_grad_()
    kd = kd_terms(z, ids, lp, KDParams(temperature=tau, weight=weight, weight_value=0.7))["kd"].sum()
    kd.backward()
    assert abs(kd.item()) < 1e-12
    assert z.grad.abs().max().item() < 1e-12


@pytest.mark.parametrize("K", [1, 4, 17])
@pytest.mark.parametrize("tau", [0.7, 1.0, 3.0])
@pytest.mark.parametrize("weight,tau_sq", [("teacher_mass", True), ("one", False), ("constant", True)])
def test_matches_naive_float64_reference_with_gradient(K, tau, weight, tau_sq):
    _, ids, lp = _teacher(4, 23, K, seed=K)
    z = torch.randn(4, 23, generator=torch.Generator().manual_seed(1)).requires_grad_()
    params = KDParams(temperature=tau, weight=weight, weight_value=0.3, tau_squared=tau_sq)
    kd = kd_terms(z, ids, lp, params)["kd"]
    ref = [_naive(z[i].detach(), ids[i], lp[i], tau, weight, 0.3, tau_sq) for i in range(4)]
    assert torch.allclose(kd.detach(), torch.tensor(ref), atol=1e-10, rtol=0)
    # Gradient against central finite differences of the naive formula.
    kd.sum().backward()
    eps = 1e-6
    for i, v in [(0, 0), (1, int(ids[1, 0])), (3, 22)]:
        zp, zm = z[i].detach().clone(), z[i].detach().clone()
        zp[v] += eps
        zm[v] -= eps
        fd = (_naive(zp, ids[i], lp[i], tau, weight, 0.3, tau_sq) - _naive(zm, ids[i], lp[i], tau, weight, 0.3,
                                                                           tau_sq)) / (2 * eps)
        assert z.grad[i, v].item() == pytest.approx(fd, abs=1e-6)


def test_truncated_baseline_is_the_renormalised_teacher_vs_full_student():
    _, ids, lp = _teacher(3, 12, 4)
    z = torch.randn(3, 12)
    tau = 2.0
    got = kd_terms(z, ids, lp, KDParams(method="truncated", temperature=tau, tau_squared=False))["kd"]
    p_tilde = (lp / tau).softmax(-1)
    log_q = (z / tau).log_softmax(-1).gather(1, ids)
    assert torch.allclose(got, (p_tilde * (p_tilde.log() - log_q)).sum(-1), atol=1e-12)


def test_bad_params_name_the_key():
    with pytest.raises(ValueError, match="kd.method"):
        KDParams(method="topk")
    with pytest.raises(ValueError, match="kd.weight"):
        KDParams(weight="mass")
    with pytest.raises(ValueError, match="kd.temperature"):
        KDParams(temperature=0)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_equals_unchunked_with_gradients(chunk):
    g = torch.Generator().manual_seed(3)
    n, d, V, K = 19, 8, 33, 5
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(V, d, generator=g).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    labels[[2, 11]] = -100
    _, ids, lp = _teacher(n, V, K, seed=4)
    fn = ce_kd_chunk(KDParams(temperature=1.5), kd_weight=0.8)
    loss, metrics = fused_head_loss(h, w, fn, [labels, ids, lp], chunk_size=chunk)
    loss.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref, ref_metrics = fn(h @ w.t(), labels, ids, lp)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(gh, h.grad, atol=1e-10) and torch.allclose(gw, w.grad, atol=1e-10)
    for k in ("ce", "kd", "mass", "cond", "p_t", "q_t"):
        assert metrics[k].item() == pytest.approx(ref_metrics[k].item(), rel=1e-10)
