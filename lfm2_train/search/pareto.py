"""Pareto fronts and exact hypervolume for minimisation objectives (quality loss, latency, memory).

Hypervolume of a set S with reference point r: the volume of the union of boxes [p, r] for p in S
(points not strictly better than r in every objective add nothing). In 3-D it is computed exactly by
slicing along the last objective: between consecutive distinct z values the cross-section is a 2-D
staircase area. O(n^2 log n), exact, fine for the tens of candidates a hardware-in-the-loop search
measures. A point's contribution is HV(S) - HV(S without it): 0 for dominated points.
"""

from __future__ import annotations

from collections.abc import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a is no worse than b everywhere and better somewhere (minimisation)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point are all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


def pareto_layers(points: Sequence[Point]) -> list[int]:
    """Non-dominated sorting: layer 0 is the front, layer 1 the front of the rest, ... (one per point)."""
    layer = [-1] * len(points)
    remaining = list(range(len(points)))
    k = 0
    while remaining:
        sub = [points[i] for i in remaining]
        front = {remaining[j] for j in pareto_front(sub)}
        for i in front:
            layer[i] = k
        remaining = [i for i in remaining if i not in front]
        k += 1
    return layer


def _area_2d(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by 2-D points below `ref` (sweep in x, keep the running minimum of y)."""
    area, best_y = 0.0, ref[1]
    pts = sorted(p for p in points if p[0] < ref[0] and p[1] < ref[1])
    for i, (x, y) in enumerate(pts):
        best_y = min(best_y, y)
        next_x = pts[i + 1][0] if i + 1 < len(pts) else ref[0]
        area += (next_x - x) * (ref[1] - best_y)
    return area


def hypervolume(points: Sequence[Point], ref: Point) -> float:
    """Exact hypervolume of 1-, 2- or 3-objective points w.r.t. `ref` (minimisation)."""
    dim = len(ref)
    pts = [tuple(float(v) for v in p) for p in points if all(v < r for v, r in zip(p, ref))]
    if any(len(p) != dim for p in points):
        raise ValueError(f"hypervolume: every point needs {dim} objectives")
    if not pts:
        return 0.0
    if dim == 1:
        return ref[0] - min(p[0] for p in pts)
    if dim == 2:
        return _area_2d([(p[0], p[1]) for p in pts], (ref[0], ref[1]))
    if dim != 3:
        raise ValueError(f"hypervolume is implemented for 1 to 3 objectives, got {dim}")
    zs = sorted({p[2] for p in pts}) + [float(ref[2])]
    volume = 0.0
    for z, z_next in zip(zs[:-1], zs[1:]):
        slab = [(p[0], p[1]) for p in pts if p[2] <= z]
        volume += _area_2d(slab, (ref[0], ref[1])) * (z_next - z)
    return volume


def contributions(points: Sequence[Point], ref: Point) -> list[float]:
    """Exclusive hypervolume of each point: HV(all) - HV(all but it)."""
    total = hypervolume(points, ref)
    return [total - hypervolume([q for j, q in enumerate(points) if j != i], ref) for i in range(len(points))]


def default_reference(points: Sequence[Point], margin: float = 0.1) -> list[float]:
    """The nadir of `points` pushed out by `margin` of each objective's range (or of its value when all
    points tie), so every point, extremes included, encloses a non-zero box."""
    if not points:
        raise ValueError("default_reference needs at least one point")
    ref = []
    for k in range(len(points[0])):
        values = [p[k] for p in points]
        lo, hi = min(values), max(values)
        span = hi - lo if hi > lo else abs(hi) or 1.0
        ref.append(hi + margin * span)
    return ref


def rank(points: Sequence[Point], ref: Point) -> list[int]:
    """Order of indices, best first: by Pareto layer, then by hypervolume contribution within the layer
    (descending), then by input order."""
    layers = pareto_layers(points)
    contrib = [0.0] * len(points)
    for k in set(layers):
        idx = [i for i, layer in enumerate(layers) if layer == k]
        for i, c in zip(idx, contributions([points[i] for i in idx], ref)):
            contrib[i] = c
    return sorted(range(len(points)), key=lambda i: (layers[i], -contrib[i], i))
