"""Merge methods over single tensors: pure functions, float32 arithmetic, mergekit's semantics.

Every function takes the tensors of one parameter (same shape) and returns the merged tensor in
float32; the caller casts to the output dtype. Parameter names and defaults follow mergekit
(`weight`, `density`, `normalize`, `rescale`, `epsilon`, `lambda`, `t`, `filter_wise`) so a user's
YAML means the same thing here. Randomised methods (DARE, DELLA) take an explicit `torch.Generator`
so a merge is reproducible tensor by tensor, whatever order the tensors are processed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DOT_THRESHOLD = 0.9995  # SLERP falls back to linear interpolation above this |cos| (mergekit's value)


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


# ------------------------------------------------------------------------------------------ linear / soup
def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """Model soup: sum_i w_i x_i, divided by sum_i w_i when `normalize`."""
    if len(tensors) != len(weights):
        raise ValueError(f"linear merge got {len(tensors)} tensors but {len(weights)} weights")
    out = torch.zeros_like(_f32(tensors[0]))
    for x, w in zip(tensors, weights):
        out.add_(_f32(x), alpha=float(w))
    if normalize:
        total = float(sum(weights))
        if total == 0:
            raise ValueError("linear merge with normalize=true needs weights that do not sum to 0")
        out.div_(total)
    return out


# ------------------------------------------------------------------------------------------ SLERP
def _dots64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> tuple[float, float, float]:
    """(a.a, b.b, a.b) accumulated in float64 a chunk at a time: exact enough for the angle of two
    large float32 vectors without a float64 copy of either."""
    aa = bb = ab = 0.0
    for i in range(0, a.numel(), chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        aa += float(x @ x)
        bb += float(y @ y)
        ab += float(x @ y)
    return aa, bb, ab


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from `a` (t=0) to `b` (t=1), treating each tensor as one flat vector.

    Magnitudes are not normalised away: the weights on `a` and `b` come from the angle between their
    directions. Nearly (anti-)parallel vectors, where the angle is ill-conditioned, use linear
    interpolation, as mergekit does.
    """
    a32, b32 = _f32(a), _f32(b)
    aa, bb, ab = _dots64(a32.reshape(-1), b32.reshape(-1))
    na, nb = math.sqrt(aa), math.sqrt(bb)
    dot = ab / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    if abs(dot) > dot_threshold:
        return (1 - t) * a32 + t * b32
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a32 + (math.sin(t * theta) / s) * b32


# ------------------------------------------------------------------------------------------ sparsification
# Element-wise work runs over flat chunks of this many entries, so a merge of the embedding matrix never
# allocates more than a few tensor-sized temporaries (see docs/MERGE.md, "memory").
CHUNK = 1 << 22


def _chunks(n: int, size: int | None = None) -> list[slice]:
    size = size or CHUNK
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _row_chunks(rows: torch.Tensor) -> list[slice]:
    return _chunks(rows.shape[0], max(1, CHUNK // max(rows.shape[1], 1)))


def magnitude_prune(delta: torch.Tensor, density: float, inplace: bool = False) -> torch.Tensor:
    """Keep the int(density * n) largest-magnitude entries (TIES' trim), zero the rest.

    Ties at the threshold are broken by flat index, first wins (what a stable descending sort does).
    A density small enough that no entry survives gives zeros.
    """
    delta = _f32(delta) if inplace else _f32(delta).clone()
    if density >= 1:
        return delta
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        return delta.zero_()
    flat = delta.view(-1)
    # The k-th largest magnitude, by an in-place numpy partition: torch.kthvalue would add a copy of the
    # tensor and an int64 index array (3x the tensor's bytes) to the peak memory of the merge.
    mag = flat.abs().numpy()
    mag.partition(n - k)
    threshold = float(mag[n - k])
    del mag
    kept, at_threshold = 0, 0
    for c in _chunks(n):
        kept += int((flat[c].abs() > threshold).sum())
    short = k - kept  # entries equal to the threshold that still fit, taken in index order
    for c in _chunks(n):
        mag = flat[c].abs()
        keep = mag > threshold
        if short > at_threshold:
            ties = torch.nonzero(mag == threshold).reshape(-1)[: short - at_threshold]
            keep[ties] = True
            at_threshold += len(ties)
        flat[c].mul_(keep)
    return delta


def random_drop(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator,
                inplace: bool = False) -> torch.Tensor:
    """DARE: keep each entry with probability `density`; survivors scaled by 1/density when `rescale`.
    Draws are made chunk by chunk from `generator` (same seed, same mask)."""
    delta = _f32(delta) if inplace else _f32(delta).clone()
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    flat = delta.view(-1)
    for c in _chunks(flat.numel()):
        mask = torch.bernoulli(torch.full((c.stop - c.start,), density), generator=generator)
        flat[c].mul_(mask.div_(density) if rescale else mask)
    return delta


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


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


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune: per row, keep probability rises linearly with magnitude rank from
    density - epsilon (smallest) to density + epsilon (largest).

    Rows are the first dimension (1-D tensors are one row; >2-D tensors are flattened after dim 0).
    A row of one element gets `density`.
    """
    _check_della(density, epsilon)
    rows = _rows(delta)
    out = torch.empty(rows.shape, dtype=torch.float32)
    for c in _row_chunks(rows):
        out[c] = _della_probs_rows(rows[c], density, epsilon)
    return out.reshape(delta.shape)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
                   generator: torch.Generator, inplace: bool = False) -> torch.Tensor:
    """Drop entries with DELLA's rank-dependent probabilities; survivors scaled by 1/p_keep when `rescale`.
    Processed a block of rows at a time (probabilities, draws and rescale)."""
    delta = _f32(delta) if inplace else _f32(delta).clone()
    if density >= 1:
        return delta
    _check_della(density, epsilon)
    rows = _rows(delta)
    for c in _row_chunks(rows):
        probs = _della_probs_rows(rows[c], density, epsilon)
        mask = torch.bernoulli(probs, generator=generator)
        rows[c] *= mask.div_(probs) if rescale else mask
    return delta


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
    epsilons: Sequence[float] | None = None,
    lambda_: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    consume: bool = False,
) -> torch.Tensor:
    """base + mix of task vectors tau_i = x_i - base: the family behind task arithmetic, TIES, DARE, DELLA.

    1. sparsify each tau_i (`magnitude` = TIES trim, `random` = DARE, `della` = MagPrune) at its density;
    2. weight it by w_i; 3. with `consensus` ("sum" or "count"), keep only entries whose sign agrees
    with the elected sign (sign of the sum, 0 counting as +); 4. sum, and with `normalize` divide by the
    sum of the weights that took part in each entry (the disjoint mean); 5. multiply by `lambda_`;
    6. add to base.

    `consume=True` lets the function overwrite the float32 inputs (base becomes the result): the
    streaming merge uses it so a tensor costs no memory beyond its inputs and one sort.
    """
    n = len(tensors)
    densities = list(densities) if densities is not None else [1.0] * n
    epsilons = list(epsilons) if epsilons is not None else [0.0] * n
    out = _f32(base) if consume else _f32(base).clone()
    if n == 0:
        return out
    if consensus not in (None, "sum", "count"):
        raise ValueError(f"consensus method {consensus!r}; choose sum or count")
    deltas = []
    for i, x in enumerate(tensors):
        delta = _f32(x) if consume else _f32(x).clone()
        delta.sub_(out)
        if sparsification == "magnitude":
            delta = magnitude_prune(delta, densities[i], inplace=True)
        elif sparsification == "random":
            delta = random_drop(delta, densities[i], rescale, generators[i], inplace=True)
        elif sparsification == "della":
            delta = della_magprune(delta, densities[i], epsilons[i], rescale, generators[i], inplace=True)
        elif sparsification is not None:
            raise ValueError(f"unknown sparsification {sparsification!r}")
        deltas.append(delta.mul_(float(weights[i])).view(-1))
    total_weight = float(sum(weights))
    flat = out.view(-1)
    for c in _chunks(flat.numel()):
        if consensus:
            votes = sum(d[c] if consensus == "sum" else torch.sign(d[c]) for d in deltas)
            elected = torch.where(votes >= 0, 1.0, -1.0)
            mixed = torch.zeros_like(elected)
            divisor = torch.zeros_like(elected)
            for d, w in zip(deltas, weights):
                agree = torch.sign(d[c]) == elected
                mixed += d[c] * agree
                divisor += agree * float(w)
            divisor[divisor == 0] = 1
        else:
            mixed = sum(d[c] for d in deltas)
            divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
        if normalize:
            mixed = mixed / divisor
        flat[c] += mixed * lambda_ if lambda_ != 1.0 else mixed
    return out


def task_arithmetic(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    normalize: bool = False) -> torch.Tensor:
    """base + sum_i lambda_i (x_i - base)."""
    return merge_task_vectors(base, tensors, weights, normalize=normalize)


def ties(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """TIES: trim each task vector to its top-`density` magnitudes, elect signs, disjoint mean."""
    return merge_task_vectors(base, tensors, weights, densities=densities, sparsification="magnitude",
                              consensus="sum", normalize=normalize)


def dare(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], generators: Sequence[torch.Generator], *, ties: bool,
         normalize: bool = False, rescale: bool = True) -> torch.Tensor:
    """DARE: drop each task-vector entry with probability 1 - density, rescale by 1/density; then TIES'
    sign election (`ties=True`, mergekit's dare_ties) or a plain weighted sum (dare_linear)."""
    return merge_task_vectors(base, tensors, weights, densities=densities, sparsification="random",
                              consensus="sum" if ties else None, normalize=normalize, rescale=rescale,
                              generators=generators)


def della(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
          densities: Sequence[float], epsilons: Sequence[float], generators: Sequence[torch.Generator], *,
          ties: bool = True, normalize: bool = True, rescale: bool = True, lambda_: float = 1.0) -> torch.Tensor:
    """DELLA: MagPrune (rank-dependent drop probabilities, 1/p rescale), then sign election (della) or a
    plain weighted sum (della_linear), scaled by lambda."""
    return merge_task_vectors(base, tensors, weights, densities=densities, sparsification="della",
                              consensus="sum" if ties else None, normalize=normalize, rescale=rescale,
                              epsilons=epsilons, lambda_=lambda_, generators=generators)


# ------------------------------------------------------------------------------------------ model stock
def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], filter_wise: bool = False,
                consume: bool = False) -> torch.Tensor:
    """Model Stock: average the fine-tuned models, then move toward the base by the ratio the angle
    between their task vectors implies, t = N cos / (1 + (N - 1) cos) (cos averaged over pairs).
    Computed as base + t * mean_i(x_i - base), which equals t * mean_i(x_i) + (1 - t) * base.

    `filter_wise` computes one angle per row (output filter) instead of one per tensor. `consume=True`
    lets the function overwrite the float32 inputs.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two fine-tuned models besides the base model")
    shape = base.shape
    out = _f32(base) if consume else _f32(base).clone()
    w0 = _rows(out) if filter_wise else out.reshape(1, -1)
    offsets = []
    for x in tensors:
        off = (_f32(x) if consume else _f32(x).clone()).reshape(w0.shape)
        offsets.append(off.sub_(w0))
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)  # (rows, 1)
    n = len(offsets)
    t = n * cos / (1 + (n - 1) * cos)
    mean = offsets[0]
    for off in offsets[1:]:
        mean += off
    w0 += mean.mul_(t / n)
    return out.reshape(shape)
