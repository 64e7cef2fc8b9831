"""Which measured candidates stay (latency / memory budgets) and how the survivors are ranked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .pareto import contributions, default_reference, hypervolume, pareto_layers, rank

LATENCY_METRICS = ("ttft_ms", "decode_p50_ms", "decode_p95_ms")
MEMORY_METRICS = ("peak_rss_mb", "rss_delta_mb")


@dataclass
class Budgets:
    """None = no limit. Latency limits apply at every measured context."""

    max_ttft_ms: float | None = None
    max_decode_ms: float | None = None  # on the p95 decode latency
    max_rss_mb: float | None = None  # on the peak RSS


def budget_violation(measurement: dict[str, Any], budgets: Budgets) -> tuple[str, str] | None:
    """(status, reason) for the first budget a measurement breaks, else None."""
    for ctx, m in measurement["contexts"].items():
        if budgets.max_ttft_ms is not None and m["ttft_ms"] > budgets.max_ttft_ms:
            return ("over_latency_budget",
                    f"TTFT {m['ttft_ms']:.1f} ms > budget {budgets.max_ttft_ms:g} ms at context {ctx}")
        if budgets.max_decode_ms is not None and m["decode_p95_ms"] > budgets.max_decode_ms:
            return ("over_latency_budget",
                    f"decode p95 {m['decode_p95_ms']:.2f} ms > budget {budgets.max_decode_ms:g} ms at context {ctx}")
    if budgets.max_rss_mb is not None and measurement["peak_rss_mb"] > budgets.max_rss_mb:
        return "over_memory_budget", f"peak RSS {measurement['peak_rss_mb']:.1f} MB > budget {budgets.max_rss_mb:g} MB"
    return None


def rank_rows(rows: Sequence[dict[str, Any]], reference: Sequence[float] | None = None, margin: float = 0.1
              ) -> dict[str, Any]:
    """Rank the rows that have all three objectives (`val_loss`, `latency`, `memory`), in place.

    Sets `rank` (1 = best), `pareto_layer` (0 = the front), `hv_contribution` (exclusive hypervolume
    within its layer) and `hv_share` (that contribution / the front's hypervolume; 0 off the front).
    -> {"reference", "hypervolume", "rule"}.
    """
    scored = [r for r in rows if r.get("val_loss") is not None and r.get("status") == "ranked"]
    if not scored:
        return {"reference": list(reference or [0.0, 0.0, 0.0]), "hypervolume": 0.0, "rule": "no candidates"}
    points = [(r["val_loss"], r["latency"], r["memory"]) for r in scored]
    if reference is None:
        ref = default_reference(points, margin)
        rule = f"worst value of each objective + {margin:g} x its range"
    else:
        ref = [float(v) for v in reference]
        if len(ref) != 3:
            raise ValueError(f"stage.reference_point needs 3 values (loss, latency, memory), got {ref}")
        rule = "stage.reference_point"
    layers = pareto_layers(points)
    front = [i for i, layer in enumerate(layers) if layer == 0]
    total = hypervolume([points[i] for i in front], ref)
    contrib = [0.0] * len(points)
    for k in set(layers):
        idx = [i for i, layer in enumerate(layers) if layer == k]
        for i, c in zip(idx, contributions([points[i] for i in idx], ref)):
            contrib[i] = c
    for position, i in enumerate(rank(points, ref), 1):
        r = scored[i]
        r.update(rank=position, pareto_layer=layers[i], hv_contribution=contrib[i],
                 hv_share=contrib[i] / total if layers[i] == 0 and total > 0 else 0.0)
    return {"reference": ref, "hypervolume": total, "rule": rule}
