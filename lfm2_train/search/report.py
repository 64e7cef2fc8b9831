"""Search outputs: `search_results.csv` (every candidate, measured or not, with why it was dropped),
`search_results.md` (the ranking, the reference point, the rejections) and `search_front.png`."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .space import Candidate

COLUMNS = ["rank", "name", "layout", "params", "status", "reason", "val_loss", "latency", "memory",
           "pareto_layer", "hv_contribution", "hv_share"]


def candidate_row(c: Candidate, status: str, reason: str = "") -> dict[str, Any]:
    """A candidate's row of the results, before measurement fills in its numbers."""
    return {"name": c.name, "layout": c.layout, "params": c.params, "hidden_size": c.hidden_size,
            "num_layers": c.num_layers, "attention_layers": list(c.attention), "conv_L_cache": c.conv_L_cache,
            "ff_ratio": c.ff_ratio, "status": status, "reason": reason, "rank": None, "val_loss": None}


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    extra = sorted({k for r in rows for k in r} - set(COLUMNS))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in COLUMNS + extra})
    return path


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return "" if v is None else v


def _f(v: Any, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_markdown(path: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Path:
    ctx = meta["context"]
    lines = [f"# Architecture search ({meta['date']})", "",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s), {meta['dtype']}, "
             f"batch {meta['batch_size']}.  ",
             f"Objectives (all minimised): quality = validation loss after {meta['train_steps']} proxy steps; "
             f"latency = `{meta['latency_metric']}` at context {ctx}; memory = `{meta['memory_metric']}`.  ",
             f"Reference point: ({', '.join(f'{v:.4g}' for v in meta['reference'])}) "
             f"({meta['reference_rule']}); total hypervolume {meta['hypervolume']:.4g}.", "",
             f"| rank | candidate | layout | params | val loss | TTFT@{ctx} ms | prefill tok/s | decode p50 ms "
             f"| decode p95 ms | peak RSS MB | front | HV share |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for r in sorted((r for r in rows if r.get("rank") is not None), key=lambda r: r["rank"]):
        lines.append(
            f"| {r['rank']} | {r['name']} | `{r['layout']}` | {r['params']:,} | {_f(r['val_loss'])} "
            f"| {_f(r.get(f'ttft_ms@{ctx}'), 1)} | {_f(r.get(f'prefill_tok_s@{ctx}'), 0)} "
            f"| {_f(r.get(f'decode_p50_ms@{ctx}'), 2)} | {_f(r.get(f'decode_p95_ms@{ctx}'), 2)} "
            f"| {_f(r.get('peak_rss_mb'), 1)} | {'yes' if r['pareto_layer'] == 0 else ''} "
            f"| {_f(r['hv_share'])} |")
    dropped = [r for r in rows if r.get("rank") is None]
    if dropped:
        lines += ["", "## Not ranked", "", "| candidate | params | status | why |", "|---|---:|---|---|"]
        lines += [f"| {r['name']} | {r['params']:,} | {r['status']} | {r['reason']} |" for r in dropped]
    if meta.get("not_sampled"):
        lines += ["", f"{meta['not_sampled']} more layouts fit the parameter budget but were left out by "
                      f"`stage.max_candidates` (seeded sample)."]
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_front(path: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Path | None:
    """Quality against latency and against memory; the Pareto front in colour, labelled by rank."""
    ranked = [r for r in rows if r.get("rank") is not None]
    if not ranked:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "latency", f"{meta['latency_metric']} @ {meta['context']} (ms)"),
                           (axes[1], "memory", f"{meta['memory_metric']} (MB)")):
        for r in ranked:
            front = r["pareto_layer"] == 0
            ax.scatter(r[key], r["val_loss"], s=60 if front else 30, c="tab:red" if front else "tab:gray",
                       zorder=3 if front else 2, edgecolors="black" if front else "none")
            ax.annotate(str(r["rank"]), (r[key], r["val_loss"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (proxy run)")
        ax.grid(alpha=0.3)
    fig.suptitle("Architecture search: red = Pareto front on (quality, latency, memory); labels = rank")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
