"""Merge methods over single tensors: pure functions with mergekit 0.1.5's arithmetic, row-chunked.

Every function takes the tensors of one parameter (same shape, any floating dtype) and returns the merged
tensor in `out_dtype` (float32 unless told otherwise). Parameter names and defaults follow mergekit
(`weight`, `density`, `gamma`, `epsilon`, `lambda`, `normalize`, `rescale`, `t`, `filter_wise`,
`select_topk`, ...) so a mergekit YAML means the same numbers here; docs/MERGE.md lists every method with
what matches and what does not.

Memory: inputs are never upcast whole. Each method walks the tensors a block of whole rows at a time
(`CHUNK` entries), upcasting only the block to float32. A method that needs a statistic of the whole
tensor (a TIES threshold, an L1 norm for rescaling, an angle, a Karcher mean) makes one or two extra
passes for it first: order statistics come from a two-pass radix selection over the float32 bit patterns
(65536-bin histograms instead of a sorted copy), spherical methods reduce to a small Gram matrix of the
inputs (their result is a linear combination of them). So a merge of bf16 checkpoints holds the bf16
inputs plus a few float32 blocks; with `consume=True` the output is written into the first input's
storage when the dtypes match. Randomised methods (DARE, DELLA) take an explicit `torch.Generator` per
model so a merge is reproducible tensor by tensor, whatever order the tensors are processed in; a pass
that must see the same draws again restores the generator's state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

DOT_THRESHOLD = 0.9995  # SLERP falls back to linear interpolation above this |cos| (mergekit's value)
L1_EPS = 1e-7  # mergekit rescales a sparsified task vector only when both L1 norms reach this
RESCALE_MODES = ("l1", "inverse_p")
# Blocks of whole rows of about this many entries are upcast at a time: a few float32 temporaries of
# this size per input are the working set on top of the inputs themselves (see docs/MERGE.md, memory).
CHUNK = 1 << 20


# ------------------------------------------------------------------------------------------ row blocks
def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, columns) view: 1-D tensors are one row, >2-D tensors are flattened after dim 0."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def _row_slices(n_rows: int, n_cols: int) -> list[slice]:
    size = max(1, CHUNK // max(n_cols, 1))
    return [slice(i, min(i + size, n_rows)) for i in range(0, n_rows, size)]


class _Blocks:
    """Tensors of one shape walked together a block of whole rows at a time, each block upcast to float32.

    A float32 input's block is a view: callers never modify a block in place."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            raise ValueError(f"merge inputs have different shapes {sorted(shapes)}")
        self.shape = tensors[0].shape
        self.rows = [_rows(t) for t in tensors]
        self.n_rows, self.n_cols = self.rows[0].shape
        self.slices = _row_slices(self.n_rows, self.n_cols)

    def __iter__(self) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        for c in self.slices:
            yield c, [r[c].float() for r in self.rows]


def _output(like: torch.Tensor, out_dtype: torch.dtype,
            reuse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output tensor and its rows view: `reuse`'s storage when its dtype fits (consume=True), else new."""
    if reuse is not None and reuse.dtype == out_dtype and reuse.is_contiguous():
        out = reuse
    else:
        out = torch.empty(like.shape, dtype=out_dtype)
    return out, _rows(out)


# ------------------------------------------------------------------------------------------ order statistics
def order_statistics(stream: Callable[[], Iterator[Sequence[torch.Tensor | None]]],
                     positions: Sequence[Sequence[int]]) -> list[list[tuple[float, int, int]]]:
    """Exact order statistics of several streams of non-negative float32 values, without a sorted copy.

    `stream()` yields, block by block, one tensor per stream (None for a stream that needs nothing).
    `positions[i]` are 0-based ascending positions wanted in stream i. Returns per stream and position
    (value, number of values strictly below it, number equal to it). Two passes: a histogram of the high
    16 bits of the float32 bit patterns (monotone in the value for non-negative floats), then one of the
    low 16 bits inside the bin that holds each wanted position. Memory: 65536 counters per position,
    where numpy's partition or `torch.kthvalue` would need a float32 copy of the whole tensor.
    """
    m = len(positions)
    hi_hist = [torch.zeros(1 << 15, dtype=torch.int64) if positions[i] else None for i in range(m)]
    for values in stream():
        for i, v in enumerate(values):
            if hi_hist[i] is not None and v is not None:
                bits = v.reshape(-1).view(torch.int32)
                hi_hist[i] += torch.bincount((bits >> 16).long(), minlength=1 << 15)
    bins: list[list[tuple[int, int]]] = []
    for i in range(m):
        cum = hi_hist[i].cumsum(0) if hi_hist[i] is not None else None
        here = []
        for p in positions[i]:
            b = int(torch.searchsorted(cum, p, right=True))  # first bin whose cumulative count exceeds p
            here.append((b, int(cum[b - 1]) if b else 0))
        bins.append(here)
    lo_hist = [[torch.zeros(1 << 16, dtype=torch.int64) for _ in positions[i]] for i in range(m)]
    for values in stream():
        for i, v in enumerate(values):
            if not bins[i] or v is None:
                continue
            bits = v.reshape(-1).view(torch.int32)
            hi = bits >> 16
            for j, (b, _) in enumerate(bins[i]):
                sel = bits[hi == b]
                if sel.numel():
                    lo_hist[i][j] += torch.bincount((sel & 0xFFFF).long(), minlength=1 << 16)
    out = []
    for i in range(m):
        here = []
        for j, p in enumerate(positions[i]):
            b, below = bins[i][j]
            cum = lo_hist[i][j].cumsum(0)
            lo = int(torch.searchsorted(cum, p - below, right=True))
            below += int(cum[lo - 1]) if lo else 0
            value = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()
            here.append((value, below, int(lo_hist[i][j][lo])))
        out.append(here)
    return out


# ------------------------------------------------------------------------------------------ sparsifiers
class _Sparsifier:
    """Turns a block of one task vector into its kept (and per-element rescaled) entries, block by block
    in order. `reset()` rewinds it so a statistics pass and the final pass see the same masks."""

    sparsifies = True
    positions: list[int] = []

    def set_stats(self, stats: list[tuple[float, int, int]]) -> None:
        pass

    def mask(self, tau: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def reset(self) -> None:
        pass


class _Keep(_Sparsifier):
    sparsifies = False

    def mask(self, tau: torch.Tensor) -> None:
        return None


class _Zero(_Sparsifier):
    def mask(self, tau: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(tau)


class _Window(_Sparsifier):
    """Keep the entries at ascending magnitude positions [start, end) of the whole tensor (TIES' top-k,
    breadcrumbs' band without the largest outliers). Entries tied at a boundary value are kept lowest
    flat index first."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end = start, end
        self.positions = [start, end - 1]
        self.quota: dict[float, int] = {}
        self.used: dict[float, int] = {}

    def set_stats(self, stats: list[tuple[float, int, int]]) -> None:
        (self.lo, *_), (self.hi, *_) = stats
        for value, below, equal in stats:  # how many entries equal to a boundary value fall in the window
            self.quota[value] = max(0, min(self.end, below + equal) - max(self.start, below))
        self.reset()

    def reset(self) -> None:
        self.used = dict.fromkeys(self.quota, 0)

    def mask(self, tau: torch.Tensor) -> torch.Tensor:
        mag = tau.abs()
        keep = (mag > self.lo) & (mag < self.hi)
        flat = keep.view(-1)
        for value, quota in self.quota.items():
            left = quota - self.used[value]
            if left <= 0:
                continue
            ties = torch.nonzero(mag.view(-1) == value).reshape(-1)[:left]
            flat[ties] = True
            self.used[value] += len(ties)
        return keep.to(torch.float32)


class _Bernoulli(_Sparsifier):
    """DARE: keep each entry with probability `density` (survivors × 1/density with `inverse_p`)."""

    def __init__(self, density: float, generator: torch.Generator, inverse_p: bool) -> None:
        self.density, self.generator, self.inverse_p = density, generator, inverse_p
        self.state = generator.get_state()

    def reset(self) -> None:
        self.generator.set_state(self.state)

    def mask(self, tau: torch.Tensor) -> torch.Tensor:
        mask = torch.bernoulli(torch.full(tau.shape, self.density), generator=self.generator)
        return mask.div_(self.density) if self.inverse_p else mask


def _della_probs_rows(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    n = rows.shape[1]
    if n == 1:
        return torch.full(rows.shape, density, dtype=torch.float32)
    order = torch.argsort(rows.abs(), dim=1, stable=True)  # ascending magnitude
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n).expand_as(order).contiguous())
    return (density - epsilon) + ranks.float() * (2 * epsilon / (n - 1))


def _check_della(density: float, epsilon: float) -> None:
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della needs 0 < density - epsilon and density + epsilon < 1; got density={density}, "
                         f"epsilon={epsilon}")


class _Della(_Sparsifier):
    """DELLA's MagPrune: per row, keep probability rising with magnitude rank (survivors × 1/p with
    `inverse_p`)."""

    def __init__(self, density: float, epsilon: float, generator: torch.Generator, inverse_p: bool) -> None:
        _check_della(density, epsilon)
        self.density, self.epsilon, self.generator, self.inverse_p = density, epsilon, generator, inverse_p
        self.state = generator.get_state()

    def reset(self) -> None:
        self.generator.set_state(self.state)

    def mask(self, tau: torch.Tensor) -> torch.Tensor:
        probs = _della_probs_rows(tau, self.density, self.epsilon)
        mask = torch.bernoulli(probs, generator=self.generator)
        return mask.div_(probs) if self.inverse_p else mask


def _sparsifier(method: str | None, n: int, density: float, *, gamma: float, epsilon: float,
                generator: torch.Generator | None, inverse_p: bool) -> _Sparsifier:
    if method is None or density >= 1:
        return _Keep()
    if method == "magnitude":  # mergekit keeps at least one entry when density > 0
        return _Window(n - max(1, int(density * n)), n) if density > 0 and n else _Zero()
    if method == "magnitude_outliers":
        target, top = int(density * n), int(gamma * n)
        bottom = max(0, n - target - top)  # the outlier cut shrinks when it would eat into the kept share
        return _Window(bottom, bottom + target) if target > 0 else _Zero()
    if method in ("random", "della"):
        if generator is None:
            raise ValueError(f"{method} sparsification needs a torch.Generator per model")
        if density <= 0:
            return _Zero()
        if method == "random":
            return _Bernoulli(density, generator, inverse_p)
        return _Della(density, epsilon, generator, inverse_p)
    raise ValueError(f"unknown sparsification {method!r}")


# ------------------------------------------------------------------------------------------ task vectors
def merge_task_vectors(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsification: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    rescale_mode: str = "l1",
    epsilons: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    lambda_: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    consume: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """base + mix of task vectors tau_i = x_i - base: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

    1. sparsify each tau_i at its density: `magnitude` (TIES: top-k magnitudes, k = max(1, int(density·n))),
       `magnitude_outliers` (breadcrumbs: drop the `gamma` share of largest magnitudes, keep the next
       int(density·n)), `random` (DARE), `della` (MagPrune, ranked within rows);
    2. with `rescale`, scale the kept entries back: `rescale_mode="l1"` (mergekit) multiplies the whole
       sparsified tau_i by ||tau_i||_1 / ||kept||_1 (skipped when either is below 1e-7); `"inverse_p"`
       (the DARE / DELLA papers) divides each kept entry by its keep probability;
    3. weight by w_i; 4. with `consensus` ("sum" or "count"), keep only entries whose sign agrees with
       the elected sign (of the sum, 0 counting as +); 5. sum, and with `normalize` divide by the sum of
       the weights taking part in each entry (all weights without consensus; a divisor of 0 becomes 1);
    6. multiply by `lambda_`; 7. add to base.

    Statistics passes (order statistics, L1 norms) run before the final pass; nothing tensor-sized is
    allocated besides the output, which reuses `base`'s storage with `consume=True`.
    """
    n = len(tensors)
    if rescale_mode not in RESCALE_MODES:
        raise ValueError(f"rescale_mode {rescale_mode!r}; choose one of {list(RESCALE_MODES)}")
    if consensus not in (None, "sum", "count"):
        raise ValueError(f"consensus method {consensus!r}; choose sum or count")
    if rescale and rescale_mode == "inverse_p" and sparsification not in ("random", "della"):
        raise ValueError("rescale_mode inverse_p divides by a keep probability: it applies to random drops "
                         "(dare_ties, dare_linear, della, della_linear) only")
    if n == 0:
        return base.to(out_dtype)
    densities = list(densities) if densities is not None else [1.0] * n
    epsilons = list(epsilons) if epsilons is not None else [0.0] * n
    gammas = list(gammas) if gammas is not None else [0.0] * n
    gens = list(generators) if generators is not None else [None] * n
    inverse_p = rescale and rescale_mode == "inverse_p"
    blocks = _Blocks([base, *tensors])
    numel = base.numel()
    sparsifiers = [_sparsifier(sparsification, numel, densities[i], gamma=gammas[i], epsilon=epsilons[i],
                               generator=gens[i], inverse_p=inverse_p) for i in range(n)]

    def taus() -> Iterator[tuple[slice, torch.Tensor, list[torch.Tensor]]]:
        for c, (b, *xs) in blocks:
            yield c, b, [x - b for x in xs]

    if any(sp.positions for sp in sparsifiers):
        stats = order_statistics(lambda: ([t.abs() if sp.positions else None for t, sp in zip(ts, sparsifiers)]
                                          for _, _, ts in taus()), [sp.positions for sp in sparsifiers])
        for sp, st in zip(sparsifiers, stats):
            sp.set_stats(st)
    scales = [1.0] * n
    if rescale and rescale_mode == "l1" and any(sp.sparsifies for sp in sparsifiers):
        before, after = [0.0] * n, [0.0] * n
        for _, _, ts in taus():
            for i, (t, sp) in enumerate(zip(ts, sparsifiers)):
                mask = sp.mask(t)
                if mask is not None:
                    before[i] += float(t.abs().sum(dtype=torch.float64))
                    after[i] += float((t * mask).abs().sum(dtype=torch.float64))
        for i, sp in enumerate(sparsifiers):
            sp.reset()
            if sp.sparsifies and before[i] >= L1_EPS and after[i] >= L1_EPS:
                scales[i] = before[i] / after[i]

    total_weight = float(sum(weights))
    out, out_rows = _output(base, out_dtype, base if consume else None)
    for c, b, ts in taus():
        deltas = []
        for t, sp, w, s in zip(ts, sparsifiers, weights, scales):
            mask = sp.mask(t)
            if mask is not None:
                t.mul_(mask)
            deltas.append(t.mul_(float(w) * s))
        if consensus:
            votes = sum(d if consensus == "sum" else torch.sign(d) for d in deltas)
            elected = torch.where(votes >= 0, 1.0, -1.0)
            mixed = torch.zeros_like(elected)
            divisor = torch.zeros_like(elected)
            for d, w in zip(deltas, weights):
                agree = torch.sign(d) == elected
                mixed += d * agree
                divisor += agree * float(w)
            divisor[divisor == 0] = 1
        else:
            mixed = sum(deltas[1:], deltas[0])
            divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
        if normalize:
            mixed = mixed / divisor
        if lambda_ != 1.0:
            mixed = mixed * lambda_
        out_rows[c] = b + mixed
    return out


def sparsify(delta: torch.Tensor, method: str, density: float, *, rescale: bool = False, rescale_mode: str = "l1",
             gamma: float = 0.01, epsilon: float = 0.15, generator: torch.Generator | None = None) -> torch.Tensor:
    """One task vector sparsified as mergekit's `sparsify` does (`magnitude`, `magnitude_outliers`,
    `random`, `della`), in float32: the same code path as a merge of it alone against a zero base."""
    return merge_task_vectors(torch.zeros_like(delta, dtype=torch.float32), [delta], [1.0], densities=[density],
                              sparsification=method, rescale=rescale, rescale_mode=rescale_mode, gammas=[gamma],
                              epsilons=[epsilon], generators=[generator] if generator is not None else None)


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the max(1, int(density·n)) largest magnitudes (ties: lowest flat index first)."""
    return sparsify(delta, "magnitude", density)


def breadcrumbs_prune(delta: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma·n) largest magnitudes as outliers and keep the next
    int(density·n); the outlier cut shrinks when both together exceed n."""
    return sparsify(delta, "magnitude_outliers", density, gamma=gamma)


def random_drop(delta: torch.Tensor, density: float, rescale: bool | str, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`. `rescale`: False, True / "l1" (mergekit: restore
    the L1 norm of the whole tensor) or "inverse_p" (the paper: survivors × 1/density)."""
    mode = rescale if isinstance(rescale, str) else "l1"
    return sparsify(delta, "random", density, rescale=bool(rescale), rescale_mode=mode, generator=generator)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune: per row, keep probability rises linearly with magnitude rank from
    density - epsilon (smallest) to density + epsilon (largest).

    Rows are the first dimension (1-D tensors are one row; >2-D tensors such as the (d, 1, k) conv
    kernel are flattened after dim 0). A row of one element gets `density`.
    """
    _check_della(density, epsilon)
    rows = _rows(delta).float()
    out = torch.empty(rows.shape, dtype=torch.float32)
    for c in _row_slices(*rows.shape):
        out[c] = _della_probs_rows(rows[c], density, epsilon)
    return out.reshape(delta.shape)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool | str,
                   generator: torch.Generator) -> torch.Tensor:
    """Drop entries with DELLA's rank-dependent probabilities. `rescale`: False, True / "l1" (mergekit)
    or "inverse_p" (the paper: each survivor × 1/p_keep)."""
    mode = rescale if isinstance(rescale, str) else "l1"
    return sparsify(delta, "della", density, rescale=bool(rescale), rescale_mode=mode, epsilon=epsilon,
                    generator=generator)


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    normalize: bool = False, lambda_: float = 1.0) -> torch.Tensor:
    """base + lambda · sum_i w_i (x_i - base)."""
    return merge_task_vectors(base, tensors, weights, normalize=normalize, lambda_=lambda_)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], normalize: bool = True, rescale: bool = False) -> torch.Tensor:
    """TIES: trim each task vector to its top-`density` magnitudes, elect signs, disjoint mean."""
    return merge_task_vectors(base, tensors, weights, densities=densities, sparsification="magnitude",
                              consensus="sum", normalize=normalize, rescale=rescale)


def breadcrumbs(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], gammas: Sequence[float], *, ties: bool = False,
                normalize: bool = False, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop both the smallest and the `gamma` largest magnitudes of each task vector;
    then a plain weighted sum (breadcrumbs) or TIES' sign election (breadcrumbs_ties)."""
    return merge_task_vectors(base, tensors, weights, densities=densities, sparsification="magnitude_outliers",
                              consensus="sum" if ties else None, normalize=normalize, rescale=rescale,
                              gammas=gammas)


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], generators: Sequence[torch.Generator], *, ties: bool,
         normalize: bool = False, rescale: bool = True, rescale_mode: str = "l1") -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 - density and rescale; then TIES' sign
    election (`ties=True`, mergekit's dare_ties) or a plain weighted sum (dare_linear)."""
    return merge_task_vectors(base, tensors, weights, densities=densities, sparsification="random",
                              consensus="sum" if ties else None, normalize=normalize, rescale=rescale,
                              rescale_mode=rescale_mode, generators=generators)


def della(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
          densities: Sequence[float], epsilons: Sequence[float], generators: Sequence[torch.Generator], *,
          ties: bool = True, normalize: bool = True, rescale: bool = True, rescale_mode: str = "l1",
          lambda_: float = 1.0) -> torch.Tensor:
    """DELLA: MagPrune (rank-dependent drop probabilities) and rescale, then sign election (della) or a
    plain weighted sum (della_linear), scaled by lambda. `rescale_mode="l1"` is mergekit's per-tensor
    L1 restoration; `"inverse_p"` the paper's per-element 1/p."""
    return merge_task_vectors(base, tensors, weights, densities=densities, sparsification="della",
                              consensus="sum" if ties else None, normalize=normalize, rescale=rescale,
                              rescale_mode=rescale_mode, epsilons=epsilons, lambda_=lambda_, generators=generators)


# ------------------------------------------------------------------------------------------ linear / soup
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True, *,
           consume: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Model soup: sum_i w_i x_i, divided by sum_i w_i when `normalize`."""
    if len(tensors) != len(weights):
        raise ValueError(f"linear merge got {len(tensors)} tensors but {len(weights)} weights")
    total = float(sum(weights))
    if normalize and total == 0:
        raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
    out, out_rows = _output(tensors[0], out_dtype, tensors[0] if consume else None)
    for c, xs in _Blocks(tensors):
        acc = xs[0] * float(weights[0])
        for x, w in zip(xs[1:], weights[1:]):
            acc.add_(x, alpha=float(w))
        out_rows[c] = acc.div_(total) if normalize else acc
    return out


def passthrough(x: torch.Tensor, scale: float | None = None, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Copy the single source (mergekit's `scale`, when given, multiplies it)."""
    if scale is None:
        return x.to(out_dtype)
    out, out_rows = _output(x, out_dtype, None)
    for c, (v,) in _Blocks([x]):
        out_rows[c] = v * float(scale)
    return out


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float, *, consume: bool = False,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NearSwap: move each entry of `base` toward `other` by w = clamp(t / |base - other|, 0, 1), so
    entries that are already close take the other model's value and distant ones stay."""
    out, out_rows = _output(base, out_dtype, base if consume else None)
    for c, (a, b) in _Blocks([base, other]):
        w = (t / (a - b).abs().clamp_(min=1e-6)).clamp_(0, 1)
        out_rows[c] = w * b + (1 - w) * a
    return out


# ------------------------------------------------------------------------------------------ spherical
def _combine(blocks: _Blocks, coefficients: Sequence[float], out: tuple[torch.Tensor, torch.Tensor],
             offset: int = 0) -> torch.Tensor:
    """out = sum_j coefficients[j] · input[offset + j] (+ input 0 when offset=1: the base)."""
    tensor, rows = out
    for c, xs in blocks:
        acc = xs[0].clone() if offset else torch.zeros_like(xs[0])
        for k, x in zip(coefficients, xs[offset:]):
            acc.add_(x if not offset else x - xs[0], alpha=float(k))
        rows[c] = acc
    return tensor


def _gram(blocks: _Blocks, offset: int = 0) -> list[list[float]]:
    """Gram matrix (float64) of the inputs from index `offset` on, minus input 0 when offset=1 (task vectors)."""
    n = len(blocks.rows) - offset
    g = torch.zeros(n, n, dtype=torch.float64)
    for _, xs in blocks:
        vs = torch.stack([(x - xs[0]) if offset else x for x in xs[offset:]]).reshape(n, -1).double()
        g += vs @ vs.T
    return g.tolist()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD, eps: float = 1e-8, *,
          consume: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), treating each tensor as one flat vector.

    Magnitudes are not normalised away: the weights on `a` and `b` come from the angle between their
    directions. Nearly (anti-)parallel vectors, where the angle is ill-conditioned, use linear
    interpolation, as mergekit does.
    """
    blocks = _Blocks([a, b])
    (aa, ab), (_, bb) = _gram(blocks)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = max(-1.0, min(1.0, ab / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))))
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return _combine(blocks, [ca, cb], _output(a, out_dtype, a if consume else None))


def _nuslerp_coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor,
                          eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's nuslerp weights per vector from float64 dots: exact colinearity (1 - cos² <= eps²) lerps."""
    na, nb = aa.sqrt().clamp(min=1e-7), bb.sqrt().clamp(min=1e-7)
    cos = (ab / (na * nb)).clamp(-1, 1)
    colinear = (1 - cos * cos) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    s = torch.sin(theta)
    ca = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / s)
    cb = torch.where(colinear, t, torch.sin(t * theta) / s)
    return ca, cb


def nuslerp(x0: torch.Tensor, x1: torch.Tensor, weights: Sequence[float], base: torch.Tensor | None = None, *,
            row_wise: bool = False, flatten: bool = True, consume: bool = False,
            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mergekit's NuSLERP: spherical interpolation of two models with t = w1 / (w0 + w1) (0.5 when the
    weights sum to ~0); with a base, of their task vectors (base + slerp(x0 - base, x1 - base)).
    `flatten` (default) treats the tensor as one vector; otherwise every row (`row_wise=False`: vectors
    along the last dimension; >2-D tensors are flattened after dim 0) or every column (`row_wise=True`:
    vectors along dim 0) is interpolated on its own."""
    total = float(sum(weights))
    t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
    inputs = [base, x0, x1] if base is not None else [x0, x1]
    blocks = _Blocks(inputs)
    off = 1 if base is not None else 0
    if flatten or x0.dim() < 2:
        (aa, ab), (_, bb) = _gram(blocks, off)
        ca, cb = _nuslerp_coefficients(t, *(torch.tensor(v, dtype=torch.float64) for v in (aa, bb, ab)))
        return _combine(blocks, [float(ca), float(cb)], _output(inputs[0], out_dtype, inputs[0] if consume else None),
                        off)
    dim = 0 if row_wise else 1  # the sum runs over this axis of the (rows, columns) view
    stats = [torch.zeros(blocks.n_cols if row_wise else blocks.n_rows, dtype=torch.float64) for _ in range(3)]
    for c, xs in blocks:
        u, v = ((xs[1] - xs[0]), (xs[2] - xs[0])) if off else (xs[0], xs[1])
        u, v = u.double(), v.double()
        for acc, prod in zip(stats, (u * u, v * v, u * v)):
            if row_wise:
                acc += prod.sum(dim)
            else:
                acc[c] = prod.sum(dim)
    ca, cb = _nuslerp_coefficients(t, *stats)
    ca, cb = (ca.float(), cb.float()) if row_wise else (ca.float().unsqueeze(1), cb.float().unsqueeze(1))
    out, out_rows = _output(inputs[0], out_dtype, inputs[0] if consume else None)
    for c, xs in blocks:
        u, v = ((xs[1] - xs[0]), (xs[2] - xs[0])) if off else (xs[0], xs[1])
        res = u * (ca if row_wise else ca[c]) + v * (cb if row_wise else cb[c])
        out_rows[c] = res + xs[0] if off else res
    return out


def _quad(g: list[list[float]], x: Sequence[float], y: Sequence[float] | None = None) -> float:
    y = x if y is None else y
    return sum(x[i] * g[i][j] * y[j] for i in range(len(x)) for j in range(len(y)))


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8, consume: bool = False,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mergekit's Multi-SLERP: barycentric interpolation on the hypersphere (of task vectors with a base).

    Each vector is projected to the unit sphere, the weighted mean direction is taken, the weighted mean
    tangent is mapped back with the exponential map and the result scaled by the weighted mean norm.
    The result is a linear combination of the inputs, so it is computed from their Gram matrix (one
    pass) and written in a second. Note that the tangent of mergekit's construction vanishes (the mean
    of the tangents at the normalised mean is zero), so the result is the normalised weighted mean of
    the unit vectors times the weighted mean norm.
    """
    if len(tensors) == 1:
        return tensors[0].to(out_dtype)
    n = len(tensors)
    w = [float(x) for x in weights]
    if normalize_weights:
        s = sum(w)
        w = [x / s for x in w]
    inputs = [base, *tensors] if base is not None else list(tensors)
    off = 1 if base is not None else 0
    blocks = _Blocks(inputs)
    g = _gram(blocks, off)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    gu = [[g[i][j] / ((norms[i] + eps) * (norms[j] + eps)) for j in range(n)] for i in range(n)]
    out = _output(inputs[0], out_dtype, inputs[0] if consume else None)
    mean_norm = math.sqrt(max(_quad(gu, w), 0.0))
    if mean_norm < eps:
        if n == 2:
            return _combine(blocks, w, out, off)
        raise ValueError("multislerp: the weighted sum of the input directions is zero (antipodal inputs whose "
                         "weights balance out); choose other weights")
    mean = [x / mean_norm for x in w]
    dots = [_quad(gu, [1.0 if j == i else 0.0 for j in range(n)], mean) for i in range(n)]
    wd = sum(wi * di for wi, di in zip(w, dots))
    tangent = [wi - wd * mi for wi, mi in zip(w, mean)]
    tn = math.sqrt(max(_quad(gu, tangent), 0.0)) + eps
    res = [mi * math.cos(tn) + ti * math.sin(tn) / tn for mi, ti in zip(mean, tangent)]
    avg_norm = sum(nrm * wi for nrm, wi in zip(norms, w))
    return _combine(blocks, [r * avg_norm / (nrm + eps) for r, nrm in zip(res, norms)], out, off)


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5, *, consume: bool = False,
            out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """mergekit's Karcher mean: the equal-weight Riemannian mean of the inputs' directions on the unit
    sphere (gradient iterations up to `max_iter`, stopping when the tangent norm falls below `tol`),
    scaled by the mean of their norms. Every iterate is a linear combination of the inputs, so the
    iteration runs on their Gram matrix (one pass) and the output is written in a second."""
    n = len(tensors)
    if n == 1:
        return tensors[0].to(out_dtype)
    blocks = _Blocks(tensors)
    g = _gram(blocks)
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(n)]
    inv = [1.0 / v if v != 0.0 else 0.0 for v in norms]  # zero tensors have a zero unit vector
    gu = [[g[i][j] * inv[i] * inv[j] for j in range(n)] for i in range(n)]
    out = _output(tensors[0], out_dtype, tensors[0] if consume else None)
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return _combine(blocks, [0.0] * n, out)
    alpha = [1.0 / len(valid) if i in valid else 0.0 for i in range(n)]
    mean = list(alpha)
    mean_norm = math.sqrt(max(_quad(gu, mean), 0.0))
    mean = [1.0 if i == valid[0] else 0.0 for i in range(n)] if mean_norm < tol else [m / mean_norm for m in mean]
    for _ in range(max_iter):
        tangent = [0.0] * n
        for i in valid:
            dot = max(-1.0, min(1.0, sum(gu[i][j] * mean[j] for j in range(n))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            f = alpha[i] * theta / math.sin(theta)
            tangent = [tj + f * ((1.0 if j == i else 0.0) - dot * mj) for j, (tj, mj) in enumerate(zip(tangent, mean))]
        tn = math.sqrt(max(_quad(gu, tangent), 0.0))
        if tn < tol:
            break
        mean = [math.cos(tn) * m + math.sin(tn) * t / tn for m, t in zip(mean, tangent)]
        unit = math.sqrt(max(_quad(gu, mean), 0.0))
        if unit > tol:
            mean = [m / unit for m in mean]
    scale = sum(nrm / n for nrm in norms)
    return _combine(blocks, [scale * m * i for m, i in zip(mean, inv)], out)


# ------------------------------------------------------------------------------------------ model stock
def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False, *,
                consume: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Model Stock: average the fine-tuned models, then move toward the base by the ratio the angle
    between their task vectors implies, t = N cos / (1 + (N - 1) cos) (cos averaged over pairs; t = 0
    where the denominator vanishes, as in mergekit). Result t · mean_i(x_i) + (1 - t) · base.

    `filter_wise` computes one angle per row (output filter) instead of one per tensor.
    """
    n = len(tensors)
    if n < 2:
        raise ValueError("model_stock needs at least two fine-tuned models besides the base model")
    blocks = _Blocks([base, *tensors])
    size = blocks.n_rows if filter_wise else 1
    sq = [torch.zeros(size, dtype=torch.float64) for _ in range(n)]
    dots = {(i, j): torch.zeros(size, dtype=torch.float64) for i in range(n) for j in range(i + 1, n)}
    for c, (b, *xs) in blocks:
        offs = [(x - b).double() for x in xs]
        where = c if filter_wise else slice(0, 1)
        for i, o in enumerate(offs):
            sq[i][where] += (o * o).sum(1) if filter_wise else (o * o).sum()
        for (i, j), acc in dots.items():
            acc[where] += (offs[i] * offs[j]).sum(1) if filter_wise else (offs[i] * offs[j]).sum()
    cos = torch.stack([(acc / (sq[i].sqrt() * sq[j].sqrt()).clamp(min=1e-6)).clamp(-1, 1)
                       for (i, j), acc in dots.items()]).mean(0)
    den = 1 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den)).float().unsqueeze(1)
    out, out_rows = _output(base, out_dtype, base if consume else None)
    for c, (b, *xs) in blocks:
        tc = t[c] if filter_wise else t
        avg = sum(xs[1:], xs[0]) / n
        out_rows[c] = tc * avg + (1 - tc) * b
    return out


# ------------------------------------------------------------------------------------------ SCE
def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0, *, consume: bool = False,
        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SCE (select, calculate, erase), as mergekit computes it: keep the `select_topk` share of entries
    where the task vectors vary most across models (population variance, among the entries where it is
    non-zero), weight each model by the mean square of its selected task vector (normalised to sum 1;
    equal weights when the sum is below 1e-6), erase entries whose sign disagrees with the sign of the
    plain sum, and take the weighted mean of what remains.

    Passes: variance order statistics (when select_topk < 1), the per-model mean squares, the merge.
    """
    n = len(tensors)
    if n == 0:
        return base.to(out_dtype)
    blocks = _Blocks([base, *tensors])
    numel = base.numel()

    def taus() -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        for c, (b, *xs) in blocks:
            yield c, b, torch.stack([x - b for x in xs])

    window: _Sparsifier = _Keep()
    if select_topk <= 0:
        window = _Zero()
    elif select_topk < 1:
        nonzero = sum(int(torch.count_nonzero(tv.var(0, unbiased=False))) for _, _, tv in taus())
        k = int(nonzero * select_topk)
        window = _Window(numel - k, numel) if k > 0 else _Zero()
        if window.positions:
            (stats,) = order_statistics(lambda: ([tv.var(0, unbiased=False).abs()] for _, _, tv in taus()),
                                        [window.positions])
            window.set_stats(stats)
    sq = torch.zeros(n, dtype=torch.float64)
    for _, _, tv in taus():
        mask = window.mask(tv.var(0, unbiased=False))
        masked = tv if mask is None else tv * mask
        sq += masked.double().square().reshape(n, -1).sum(1)
    window.reset()
    weights = sq / numel
    total = float(weights.sum())
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64) if abs(total) < 1e-6 else weights / total
    w = weights.float().reshape(n, *([1] * (len(blocks.rows[0].shape))))
    out, out_rows = _output(base, out_dtype, base if consume else None)
    for c, b, tv in taus():
        mask = window.mask(tv.var(0, unbiased=False))
        if mask is not None:
            tv.mul_(mask)
        elected = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
        erased = w * (torch.sign(tv) == elected)
        merged = (tv * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
        out_rows[c] = b + merged
    return out
