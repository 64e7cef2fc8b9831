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
    # mergekit keeps at least one entry for any density > 0; density 0 keeps nothing
    assert methods.magnitude_prune(delta, 0.1).tolist() == [0.0, -2.0, 0.0, 0.0, 0.0, 0.0]
    assert methods.magnitude_prune(delta, 0.0).abs().sum() == 0


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def ref_rescale(tau: list[float], mask: list[float], probs: list[float], mode: str) -> list[float]:
    """mergekit's L1 restoration (one factor per tensor, skipped below 1e-7) or the papers' 1/p per entry."""
    kept = [v * m for v, m in zip(tau, mask)]
    if mode == "inverse_p":
        return [v / p for v, p in zip(kept, probs)]
    before, after = sum(abs(v) for v in tau), sum(abs(v) for v in kept)
    return kept if before < 1e-7 or after < 1e-7 else [v * before / after for v in kept]


@pytest.mark.parametrize("mode", ["l1", "inverse_p"])
@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("density", [0.4, 1.0])
def test_dare_matches_reference_with_fixed_seed(ties, density, mode):
    base, xs = _rand(0), [_rand(1), _rand(2)]
    ws, ds = [0.8, 0.5], [density, 0.7]
    seeds = [11, 12]
    taus = []
    for t, d, g in zip(ref_taus(base, xs), ds, _gens(seeds)):
        if d >= 1:
            taus.append(t)
            continue
        mask = torch.bernoulli(torch.full(SHAPE, d), generator=g).reshape(-1).tolist()
        taus.append(ref_rescale(t, mask, [d] * len(t), mode))
    out = methods.dare(base, xs, ws, ds, _gens(seeds), ties=ties, rescale_mode=mode)
    _close(out, ref_gta(base, xs, ws, taus, ties, False))
    again = methods.dare(base, xs, ws, ds, _gens(seeds), ties=ties, rescale_mode=mode)
    assert torch.equal(out, again)
    if density < 1:
        assert not torch.equal(out, methods.dare(base, xs, ws, ds, _gens([1, 2]), ties=ties, rescale_mode=mode))


def test_dare_keeps_about_density_and_rescales():
    delta = torch.ones(20000)
    paper = methods.random_drop(delta, 0.25, "inverse_p", torch.Generator().manual_seed(0))
    kept = (paper != 0).float().mean().item()
    assert kept == pytest.approx(0.25, abs=0.02)
    assert set(paper.unique().tolist()) == {0.0, 4.0}
    # mergekit: one factor for the tensor, restoring its L1 norm: 1 / (kept share), not 1 / density
    l1 = methods.random_drop(delta, 0.25, True, torch.Generator().manual_seed(0))
    assert torch.equal(l1 != 0, paper != 0)
    values = l1.unique().tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / kept, rel=1e-5)
    assert l1.sum().item() == pytest.approx(20000, rel=1e-6)


@pytest.mark.parametrize("mode", ["l1", "inverse_p"])
@pytest.mark.parametrize("ties", [True, False])
def test_della_matches_reference(ties, mode):
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
        taus.append(ref_rescale(t, mask, probs, mode))
    out = methods.della(base, xs, ws, ds, eps, _gens([5, 6]), ties=ties, normalize=ties, lambda_=lam,
                        rescale_mode=mode)
    _close(out, ref_gta(base, xs, ws, taus, ties, ties, lam))


def test_della_ranks_conv_kernels_within_flattened_rows():
    """(d, 1, k) kernels rank the k taps of each channel together (mergekit would rank along the size-1
    axis and fail on NaN probabilities)."""
    delta = torch.tensor([[[0.1, -0.3, 0.2]], [[5.0, 1.0, -3.0]]])
    probs = methods.della_keep_probabilities(delta, 0.5, 0.1)
    assert probs.shape == delta.shape
    torch.testing.assert_close(probs, torch.tensor([[[0.4, 0.6, 0.5]], [[0.6, 0.4, 0.5]]]))
    out = methods.della_magprune(delta, 0.5, 0.1, True, torch.Generator().manual_seed(0))
    assert out.shape == delta.shape and torch.isfinite(out).all()


def test_inverse_p_is_refused_for_magnitude_methods():
    base, xs = _rand(0), [_rand(1)]
    with pytest.raises(ValueError, match="inverse_p"):
        methods.merge_task_vectors(base, xs, [1.0], densities=[0.5], sparsification="magnitude", rescale=True,
                                   rescale_mode="inverse_p")


def ref_window(tau: list[float], start: int, end: int) -> list[float]:
    """Keep ascending-magnitude positions [start, end); ties at a boundary value: lowest index first."""
    mags = sorted(abs(v) for v in tau)
    lo, hi = mags[start], mags[end - 1]
    quota = {}
    for value in {lo, hi}:
        below, equal = sum(m < value for m in mags), sum(m == value for m in mags)
        quota[value] = max(0, min(end, below + equal) - max(start, below))
    out = []
    for v in tau:
        m = abs(v)
        if lo < m < hi:
            out.append(v)
        elif m in quota and quota[m] > 0:
            quota[m] -= 1
            out.append(v)
        else:
            out.append(0.0)
    return out


@pytest.mark.parametrize("density,gamma", [(0.6, 0.1), (0.9, 0.2), (0.3, 0.0), (0.05, 0.01)])
@pytest.mark.parametrize("ties", [False, True])
def test_breadcrumbs_matches_reference(density, gamma, ties):
    base, xs = _rand(0), [_rand(1), _rand(2)]
    ws = [1.0, 0.6]
    taus = []
    for t in ref_taus(base, xs):
        n = len(t)
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)
        taus.append(ref_window(t, bottom, bottom + target) if target else [0.0] * n)
    out = methods.breadcrumbs(base, xs, ws, [density] * 2, [gamma] * 2, ties=ties, normalize=ties)
    _close(out, ref_gta(base, xs, ws, taus, ties, ties))


def test_breadcrumbs_ties_at_both_boundaries_keep_lowest_index():
    delta = torch.tensor([3.0, 1.0, -3.0, 2.0, 1.0, 3.0, 0.5, 2.0, 1.0, 0.0])
    # n=10, density 0.5, gamma 0.2: drop 2 largest (two of the three 3s), keep ascending positions [3, 8)
    out = methods.breadcrumbs_prune(delta, 0.5, 0.2)
    assert out.tolist() == ref_window(delta.tolist(), 3, 8)
    assert out.tolist() == [3.0, 1.0, 0.0, 2.0, 1.0, 0.0, 0.0, 2.0, 0.0, 0.0]


def test_order_statistics_are_exact_with_ties_zeros_and_blocks():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(3000, generator=gen).abs(), torch.zeros(50), torch.full((40,), 0.5),
                        torch.tensor([1e-30, 3e38, 1e-40])])  # a denormal and a huge value too
    values = values[torch.randperm(len(values), generator=gen)]
    ordered = values.sort().values
    positions = [0, 10, 49, 50, 1500, len(values) - 1]
    for step in (len(values), 128):
        stream = lambda step=step: ([values[i:i + step]] for i in range(0, len(values), step))  # noqa: E731
        (stats,) = methods.order_statistics(stream, [positions])
        for p, (value, below, equal) in zip(positions, stats):
            assert value == ordered[p].item()
            assert below == int((values < value).sum()) and equal == int((values == value).sum())


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


def _every_method(base, xs):
    gens = lambda: _gens([3, 4, 5])  # noqa: E731
    ws, ds = [1.0, 0.6, 0.3], [0.4, 0.5, 0.8]
    return {
        "linear": lambda b, x: methods.linear([b, *x], [0.2, 0.5, 0.3, 0.4]),
        "slerp": lambda b, x: methods.slerp(b, x[0], 0.3),
        "nuslerp": lambda b, x: methods.nuslerp(x[0], x[1], [0.3, 0.7], b),
        "nuslerp_rows": lambda b, x: methods.nuslerp(x[0], x[1], [0.3, 0.7], flatten=False),
        "nuslerp_cols": lambda b, x: methods.nuslerp(x[0], x[1], [0.3, 0.7], b, flatten=False, row_wise=True),
        "multislerp": lambda b, x: methods.multislerp(x, [0.5, 0.3, 0.2], b),
        "karcher": lambda b, x: methods.karcher([b, *x]),
        "nearswap": lambda b, x: methods.nearswap(b, x[0], 0.5),
        "ties": lambda b, x: methods.ties(b, x, ws, ds),
        "breadcrumbs": lambda b, x: methods.breadcrumbs(b, x, ws, ds, [0.1] * 3, ties=True),
        "dare": lambda b, x: methods.dare(b, x, ws, ds, gens(), ties=True),
        "della": lambda b, x: methods.della(b, x, ws, ds, [0.1] * 3, gens()),
        "model_stock": lambda b, x: methods.model_stock(b, x, filter_wise=True),
        "sce": lambda b, x: methods.sce(b, x, select_topk=0.4),
    }


def test_every_method_is_independent_of_the_block_size(monkeypatch):
    """Multi-pass methods (order statistics, L1 norms, Gram matrices, per-row angles) give the same
    result whether a tensor is one block or many."""
    base, xs = _rand(0, (9, 6)), [_rand(i, (9, 6)) for i in (1, 2, 3)]
    whole = {name: fn(base, xs) for name, fn in _every_method(base, xs).items()}
    monkeypatch.setattr(methods, "CHUNK", 12)  # two rows per block
    for name, fn in _every_method(base, xs).items():
        torch.testing.assert_close(fn(base, xs), whole[name], rtol=1e-6, atol=1e-6, msg=name)


def test_bf16_inputs_are_upcast_per_block_and_output_reuses_storage():
    base, xs = _rand(0, (9, 6)).bfloat16(), [_rand(i, (9, 6)).bfloat16() for i in (1, 2)]
    ref = methods.ties(base.float(), [x.float() for x in xs], [1.0, 0.5], [0.5, 0.5]).bfloat16()
    b2 = base.clone()
    out = methods.merge_task_vectors(b2, xs, [1.0, 0.5], densities=[0.5, 0.5], sparsification="magnitude",
                                     consensus="sum", normalize=True, consume=True, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.data_ptr() == b2.data_ptr()
    assert torch.equal(out, ref)
    # without consume the inputs are left alone; a float32 output never aliases a bf16 input
    out32 = methods.slerp(base, xs[0], 0.4, consume=True)
    assert out32.dtype == torch.float32 and torch.equal(base, _rand(0, (9, 6)).bfloat16())


def test_multislerp_and_karcher_reduce_to_known_cases():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 2.0, 0.0])
    # karcher of two: the midpoint direction on the sphere, scaled by the mean norm (1.5)
    torch.testing.assert_close(methods.karcher([a, b]), torch.tensor([1.5, 1.5, 0.0]) / math.sqrt(2))
    # multislerp: the normalised weighted mean of the unit directions, scaled by the weighted mean norm
    out = methods.multislerp([a, b], [0.25, 0.75])
    mean = torch.tensor([0.25, 0.75, 0.0])
    torch.testing.assert_close(out, mean / mean.norm() * (0.25 * 1 + 0.75 * 2), rtol=1e-6, atol=1e-6)


def test_nearswap_and_sce_match_reference():
    base, other = _rand(0), _rand(1)
    t = 0.4
    ref = []
    for a, b in zip(_f64(base), _f64(other)):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        ref.append(w * b + (1 - w) * a)
    _close(methods.nearswap(base, other, t), ref)
    xs = [_rand(1), _rand(2), _rand(3)]
    taus = ref_taus(base, xs)
    n = len(taus[0])
    var = [sum((t[i] - sum(u[i] for u in taus) / 3) ** 2 for t in taus) / 3 for i in range(n)]
    k = int(sum(v != 0 for v in var) * 0.5)
    keep = set(sorted(range(n), key=lambda i: -var[i])[:k])
    masked = [[v if i in keep else 0.0 for i, v in enumerate(t)] for t in taus]
    ms = [sum(v * v for v in t) / n for t in masked]
    ws = [m / sum(ms) for m in ms]
    out = []
    for i, b in enumerate(_f64(base)):
        elected = 1.0 if sum(t[i] for t in masked) >= 0 else -1.0
        ew = [w if t[i] != 0 and math.copysign(1.0, t[i]) == elected else 0.0 for w, t in zip(ws, masked)]
        out.append(b + sum(t[i] * e for t, e in zip(masked, ew)) / max(sum(ew), 1e-6))
    _close(methods.sce(base, xs, select_topk=0.5), out)
