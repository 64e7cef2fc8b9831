"""Each merge method against a naive float64 reference written with loops over elements."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lfm2_train.merge import methods

SHAPE = (5, 7)


def _rand(seed: int, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _f64(t: torch.Tensor) -> list[float]:
    return t.double().reshape(-1).tolist()


def _close(out: torch.Tensor, ref: list[float], tol: float = 1e-5) -> None:
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.double().reshape(-1).numpy(), np.array(ref), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------ naive references
def ref_linear(xs, ws, normalize):
    cols = [_f64(x) for x in xs]
    out = [sum(w * c[i] for w, c in zip(ws, cols)) for i in range(len(cols[0]))]
    return [v / sum(ws) for v in out] if normalize else out


def ref_trim(tau: list[float], density: float) -> list[float]:
    if density >= 1:
        return tau
    k = int(density * len(tau))
    order = sorted(range(len(tau)), key=lambda i: -abs(tau[i]))  # sorted() is stable: first index wins ties
    keep = set(order[:k])
    return [v if i in keep else 0.0 for i, v in enumerate(tau)]


def ref_gta(base, xs, ws, taus, consensus, normalize, lam=1.0):
    """Given sparsified task vectors `taus`: weight, (elect signs), sum, (normalise), scale, add."""
    b = _f64(base)
    out = []
    for i in range(len(b)):
        wd = [w * t[i] for w, t in zip(ws, taus)]
        if consensus:
            elected = 1.0 if sum(wd) >= 0 else -1.0
            agree = [v != 0 and math.copysign(1.0, v) == elected for v in wd]
            num = sum(v for v, a in zip(wd, agree) if a)
            den = sum(w for w, a in zip(ws, agree) if a) or 1.0
        else:
            num = sum(wd)
            den = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
        out.append(b[i] + lam * (num / den if normalize else num))
    return out


def ref_taus(base, xs):
    b = _f64(base)
    return [[v - bv for v, bv in zip(_f64(x), b)] for x in xs]


def ref_slerp(a, b, t):
    va, vb = _f64(a), _f64(b)
    na, nb = math.sqrt(sum(v * v for v in va)), math.sqrt(sum(v * v for v in vb))
    ua = [v / na for v in va] if na > 1e-8 else va
    ub = [v / nb for v in vb] if nb > 1e-8 else vb
    dot = sum(x * y for x, y in zip(ua, ub))
    if abs(dot) > 0.9995:
        return [(1 - t) * x + t * y for x, y in zip(va, vb)]
    theta = math.acos(dot)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return [s0 * x + s1 * y for x, y in zip(va, vb)]


def ref_della_probs(tau_rows: list[list[float]], density: float, eps: float) -> list[float]:
    out = []
    for row in tau_rows:
        n = len(row)
        order = sorted(range(n), key=lambda i: abs(row[i]))  # ascending, stable
        rank = [0] * n
        for r, i in enumerate(order):
            rank[i] = r
        out += [density - eps + 2 * eps * rank[i] / (n - 1) for i in range(n)]
    return out


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(normalize):
    xs = [_rand(i) for i in range(3)]
    ws = [0.2, 0.5, 1.3]
    _close(methods.linear(xs, ws, normalize), ref_linear(xs, ws, normalize))


def test_linear_bf16_inputs_are_upcast():
    xs = [_rand(i).bfloat16() for i in range(2)]
    _close(methods.linear(xs, [1.0, 1.0]), ref_linear(xs, [1.0, 1.0], True))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_reference(t):
    a, b = _rand(0), _rand(1)
    out = methods.slerp(a, b, t)
    _close(out, ref_slerp(a, b, t))
    if t == 0.0:
        _close(out, _f64(a), 1e-6)
    if t == 1.0:
        _close(out, _f64(b), 1e-6)


@pytest.mark.parametrize("scale", [2.5, -3.0])
def test_slerp_parallel_and_antiparallel_fall_back_to_lerp(scale):
    a = _rand(0)
    b = a * scale
    out = methods.slerp(a, b, 0.3)
    _close(out, [0.7 * x + 0.3 * y for x, y in zip(_f64(a), _f64(b))])
    assert torch.isfinite(out).all()


def test_slerp_orthogonal_keeps_unit_norm():
    a = torch.zeros(8)
    b = torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    out = methods.slerp(a, b, 0.5)
    assert out.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert out[0].item() == pytest.approx(math.sqrt(0.5), abs=1e-6)


def test_task_arithmetic_matches_reference():
    base, xs = _rand(0), [_rand(1), _rand(2)]
    ws = [0.7, -0.4]
    taus = ref_taus(base, xs)
    _close(methods.task_arithmetic(base, xs, ws), ref_gta(base, xs, ws, taus, False, False))
    _close(methods.task_arithmetic(base, xs, ws, normalize=True), ref_gta(base, xs, ws, taus, False, True))


@pytest.mark.parametrize("density", [0.3, 0.55, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(density, normalize):
    base, xs = _rand(0), [_rand(1), _rand(2), _rand(3)]
    ws, ds = [1.0, 0.6, 0.3], [density, density, 0.8]
    taus = [ref_trim(t, d) for t, d in zip(ref_taus(base, xs), ds)]
    _close(methods.ties(base, xs, ws, ds, normalize=normalize), ref_gta(base, xs, ws, taus, True, normalize))


def test_ties_zero_task_vector_returns_base_contribution_only():
    base, other = _rand(0), _rand(1)
    xs = [base.clone(), other]
    ws, ds = [1.0, 1.0], [0.5, 0.5]
    taus = [ref_trim(t, d) for t, d in zip(ref_taus(base, xs), ds)]
    out = methods.ties(base, xs, ws, ds)
    _close(out, ref_gta(base, xs, ws, taus, True, True))
    # every model's task vector zero: the base comes back unchanged
    assert torch.equal(methods.ties(base, [base.clone(), base.clone()], ws, ds), base)
    assert torch.equal(methods.task_arithmetic(base, [base.clone()], [1.0]), base)


def test_magnitude_prune_ties_at_threshold_keep_first_index():
    delta = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5, -2.0])
    out = methods.magnitude_prune(delta, 0.5)  # k = 3 of four equal magnitudes: the first three win
    assert out.tolist() == [0.0, -2.0, 2.0, 2.0, 0.0, 0.0]
    assert methods.magnitude_prune(delta, 0.1).abs().sum() == 0  # k = 0: nothing survives


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("density", [0.4, 1.0])
def test_dare_matches_reference_with_fixed_seed(ties, density):
    base, xs = _rand(0), [_rand(1), _rand(2)]
    ws, ds = [0.8, 0.5], [density, 0.7]
    seeds = [11, 12]
    masks = [torch.bernoulli(torch.full(SHAPE, d), generator=g).reshape(-1).tolist() if d < 1 else [1.0] * 35
             for d, g in zip(ds, _gens(seeds))]
    taus = [[v * m / d for v, m in zip(t, mk)] for t, mk, d in zip(ref_taus(base, xs), masks, ds)]
    out = methods.dare(base, xs, ws, ds, _gens(seeds), ties=ties)
    _close(out, ref_gta(base, xs, ws, taus, ties, False))
    again = methods.dare(base, xs, ws, ds, _gens(seeds), ties=ties)
    assert torch.equal(out, again)
    if density < 1:
        assert not torch.equal(out, methods.dare(base, xs, ws, ds, _gens([1, 2]), ties=ties))


def test_dare_keeps_about_density_and_rescales():
    delta = torch.ones(20000)
    out = methods.random_drop(delta, 0.25, True, torch.Generator().manual_seed(0))
    kept = (out != 0).float().mean().item()
    assert kept == pytest.approx(0.25, abs=0.02)
    assert set(out.unique().tolist()) == {0.0, 4.0}


@pytest.mark.parametrize("ties", [True, False])
def test_della_matches_reference(ties):
    base, xs = _rand(0), [_rand(1), _rand(2)]
    ws, ds, eps, lam = [1.0, 0.7], [0.5, 0.6], [0.1, 0.2], 1.3
    taus64 = ref_taus(base, xs)
    gens = _gens([5, 6])
    taus = []
    for t, d, e, g in zip(taus64, ds, eps, gens):
        rows = [t[r * SHAPE[1]:(r + 1) * SHAPE[1]] for r in range(SHAPE[0])]
        probs = ref_della_probs(rows, d, e)
        delta32 = torch.tensor(t, dtype=torch.float32).reshape(SHAPE)
        np.testing.assert_allclose(methods.della_keep_probabilities(delta32, d, e).reshape(-1).numpy(), probs,
                                   rtol=1e-6, atol=1e-6)
        mask = torch.bernoulli(torch.tensor(probs, dtype=torch.float32), generator=g).tolist()
        taus.append([v * m / p for v, m, p in zip(t, mask, probs)])
    out = methods.della(base, xs, ws, ds, eps, _gens([5, 6]), ties=ties, normalize=ties, lambda_=lam)
    _close(out, ref_gta(base, xs, ws, taus, ties, ties, lam))


def test_della_refuses_epsilon_outside_density():
    with pytest.raises(ValueError, match="density - epsilon"):
        methods.della_keep_probabilities(torch.ones(4, 4), 0.1, 0.2)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(filter_wise):
    base, xs = _rand(0), [_rand(1), _rand(2), _rand(3)]
    b = [_f64(base)[r * 7:(r + 1) * 7] for r in range(5)] if filter_wise else [_f64(base)]
    ws = [[_f64(x)[r * 7:(r + 1) * 7] for r in range(5)] if filter_wise else [_f64(x)] for x in xs]
    out = []
    for r, w0 in enumerate(b):
        offs = [[v - u for v, u in zip(w[r], w0)] for w in ws]
        cos = []
        for i in range(len(offs)):
            for j in range(i + 1, len(offs)):
                dot = sum(p * q for p, q in zip(offs[i], offs[j]))
                norm = math.sqrt(sum(p * p for p in offs[i])) * math.sqrt(sum(q * q for q in offs[j]))
                cos.append(max(-1.0, min(1.0, dot / max(norm, 1e-6))))
        c = sum(cos) / len(cos)
        n = len(ws)
        t = n * c / (1 + (n - 1) * c)
        avg = [sum(w[r][k] for w in ws) / n for k in range(len(w0))]
        out += [t * a + (1 - t) * u for a, u in zip(avg, w0)]
    _close(methods.model_stock(base, xs, filter_wise=filter_wise), out, 1e-4)


def test_model_stock_zero_task_vectors_give_base():
    base = _rand(0)
    assert torch.allclose(methods.model_stock(base, [base.clone(), base.clone()]), base)


def test_chunked_processing_equals_whole_tensor(monkeypatch):
    """Large tensors are processed in flat chunks; the result must not depend on the chunk size."""
    base, xs = _rand(0), [_rand(1), _rand(2), _rand(3)]
    ws, ds = [1.0, 0.6, 0.3], [0.4, 0.5, 0.8]
    whole = methods.ties(base, xs, ws, ds)
    stock = methods.model_stock(base, xs, filter_wise=True)
    delta = torch.tensor([1.0, -2.0, 2.0, 2.0, 0.5, -2.0, 2.0, 0.1, 2.0])
    monkeypatch.setattr(methods, "CHUNK", 4)
    assert torch.equal(methods.ties(base, xs, ws, ds), whole)
    assert torch.equal(methods.model_stock(base, xs, filter_wise=True), stock)
    # ties at the threshold spanning chunk boundaries: still the first k by index
    assert methods.magnitude_prune(delta, 0.5).tolist() == [0.0, -2.0, 2.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0]
    taus = [ref_trim(t, d) for t, d in zip(ref_taus(base, xs), ds)]
    _close(methods.ties(base, xs, ws, ds), ref_gta(base, xs, ws, taus, True, True))


def test_consume_overwrites_inputs_and_gives_the_same_result():
    base, xs = _rand(0), [_rand(1), _rand(2)]
    pure = methods.merge_task_vectors(base, xs, [0.5, 0.5], densities=[0.5, 0.5], sparsification="magnitude",
                                      consensus="sum", normalize=True)
    assert torch.equal(base, _rand(0))  # the pure call left its inputs alone
    b2, x2 = base.clone(), [x.clone() for x in xs]
    out = methods.merge_task_vectors(b2, x2, [0.5, 0.5], densities=[0.5, 0.5], sparsification="magnitude",
                                     consensus="sum", normalize=True, consume=True)
    assert torch.equal(out, pure) and out.data_ptr() == b2.data_ptr()
