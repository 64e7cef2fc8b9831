"""`stage=search`: hardware-in-the-loop architecture search (docs/SEARCH.md).

1. enumerate layouts under the parameter budget (exact counts, meta device);
2. measure each on this machine in its own subprocess (TTFT, prefill tok/s, decode p50/p95, peak RSS at
   every configured context) and drop those over the latency / memory budgets, recording why;
3. train each survivor briefly on the run's data and take its validation loss (the quality proxy);
4. rank by Pareto layer and hypervolume contribution on (validation loss, latency, memory);
5. write search_results.csv / .md, search_front.png and search_results.json.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..data.format import verify_shards, write_json_atomic
from ..data.resolve import resolve_dataset
from ..model import get_preset
from ..search.measure import DTYPES, MeasureError, machine_description, measure_in_subprocess
from ..search.quality import train_and_score
from ..search.report import candidate_row, plot_front, write_csv, write_markdown
from ..search.select import LATENCY_METRICS, MEMORY_METRICS, Budgets, budget_violation, rank_rows
from ..search.space import Candidate, enumerate_candidates


def _check(stage: DictConfig, cfg: DictConfig) -> None:
    if cfg.model.init_from:
        raise ValueError("stage=search trains every candidate from scratch: unset model.init_from")
    if stage.latency_metric not in LATENCY_METRICS:
        raise ValueError(f"stage.latency_metric={stage.latency_metric!r}; choose one of {LATENCY_METRICS}")
    if stage.memory_metric not in MEMORY_METRICS:
        raise ValueError(f"stage.memory_metric={stage.memory_metric!r}; choose one of {MEMORY_METRICS}")
    if stage.dtype not in DTYPES:
        raise ValueError(f"stage.dtype={stage.dtype!r}; choose one of {DTYPES}")
    if stage.runtime not in ("fast", "reference"):
        raise ValueError(f"stage.runtime={stage.runtime!r}; choose fast or reference")
    if not stage.contexts or any(c < 1 for c in stage.contexts):
        raise ValueError(f"stage.contexts={list(stage.contexts)} must be a non-empty list of positive lengths")
    for key in ("param_budget", "decode_tokens", "train_steps", "train_seq_len", "train_batch_size", "repeats"):
        if stage[key] < 1:
            raise ValueError(f"stage.{key}={stage[key]} must be >= 1")


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    _check(stage, cfg)
    started = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = get_preset(cfg.model.preset)
    dataset = resolve_dataset(cfg.data)  # once, before any measurement: bad data fails fast
    if cfg.data.verify_hashes:
        verify_shards(dataset[0])
    sp = stage.space
    space = enumerate_candidates(base, list(sp.hidden_sizes), list(sp.num_layers), list(sp.attention_counts),
                                 list(sp.placements), list(sp.conv_L_cache), list(sp.ff_ratios), stage.param_budget,
                                 head_dim=sp.head_dim, min_params=stage.min_params,
                                 max_candidates=stage.max_candidates, seed=cfg.seed)
    rows = [candidate_row(c, "over_param_budget", f"{c.params:,} params outside [{stage.min_params:,}, "
                                         f"{stage.param_budget:,}]") for c in space.over_budget]
    print(f"search: {len(space.candidates)} candidates within {stage.param_budget:,} params "
          f"({len(space.over_budget)} outside the budget, {space.not_sampled} not sampled)")
    budgets = Budgets(stage.max_ttft_ms, stage.max_decode_ms, stage.max_rss_mb)
    ctx = str(max(stage.contexts))

    survivors: list[tuple[Candidate, dict[str, Any]]] = []
    for i, cand in enumerate(space.candidates, 1):
        row = candidate_row(cand, "measured")
        rows.append(row)
        spec = {"config": {**base.to_dict(), **cand.overrides}, "contexts": list(stage.contexts),
                "decode_tokens": stage.decode_tokens, "batch_size": stage.batch_size, "threads": stage.threads,
                "dtype": stage.dtype, "repeats": stage.repeats, "seed": cfg.seed, "runtime": stage.runtime}
        try:
            m = measure_in_subprocess(spec, stage.measure_timeout_s)
        except MeasureError as e:
            row.update(status="measure_failed", reason=str(e))
            print(f"  [{i}/{len(space.candidates)}] {cand.name}: {e}")
            continue
        for c, vals in m["contexts"].items():
            row.update({f"{k}@{c}": v for k, v in vals.items()})
        row.update(peak_rss_mb=m["peak_rss_mb"], rss_delta_mb=m["rss_delta_mb"], weights_mb=m["weights_mb"],
                   latency=m["contexts"][ctx][stage.latency_metric], memory=m[stage.memory_metric])
        violation = budget_violation(m, budgets)
        print(f"  [{i}/{len(space.candidates)}] {cand.name} ({cand.params:,} params): TTFT@{ctx} "
              f"{m['contexts'][ctx]['ttft_ms']:.1f} ms, decode p50 {m['contexts'][ctx]['decode_p50_ms']:.2f} ms, "
              f"peak RSS {m['peak_rss_mb']:.0f} MB" + (f" -> dropped: {violation[1]}" if violation else ""))
        if violation:
            row.update(status=violation[0], reason=violation[1])
        else:
            survivors.append((cand, row))

    for i, (cand, row) in enumerate(survivors, 1):
        q = train_and_score(cfg, cand, out_dir / "candidates" / cand.name, dataset)
        row.update(val_loss=q["val_loss"], train_loss=q["train_loss"], train_seconds=q["train_seconds"],
                   checkpoint=q["checkpoint"], status="ranked")
        print(f"  proxy [{i}/{len(survivors)}] {cand.name}: val loss {q['val_loss']:.4f} "
              f"({q['train_seconds']:.1f}s)")

    reference = list(stage.reference_point) if stage.reference_point is not None else None
    ranking = rank_rows(rows, reference, stage.reference_margin)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_description(),
            "torch": torch.__version__, "threads": stage.threads, "dtype": stage.dtype,
            "batch_size": stage.batch_size, "train_steps": stage.train_steps, "context": int(ctx),
            "latency_metric": stage.latency_metric, "memory_metric": stage.memory_metric,
            "reference": ranking["reference"], "reference_rule": ranking["rule"],
            "hypervolume": ranking["hypervolume"], "not_sampled": space.not_sampled}
    rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0))
    csv_path = write_csv(out_dir / "search_results.csv", rows)
    md_path = write_markdown(out_dir / "search_results.md", rows, meta)
    png = plot_front(out_dir / "search_front.png", rows, meta)
    seconds = time.perf_counter() - started
    meta["seconds"] = round(seconds, 1)
    meta["config"] = OmegaConf.to_container(stage, resolve=True)
    write_json_atomic(out_dir / "search_results.json", {"meta": meta, "candidates": rows})
    print("\n" + md_path.read_text() + f"\nsearch finished in {seconds:.0f}s; results in {out_dir}")
    ranked = [r for r in rows if r["rank"] is not None]
    return {"candidates": len(rows), "ranked": len(ranked), "best": ranked[0]["name"] if ranked else None,
            "front": [r["name"] for r in ranked if r["pareto_layer"] == 0], "csv": str(csv_path),
            "markdown": str(md_path), "plot": str(png) if png else None, "seconds": round(seconds, 1),
            "output_dir": str(out_dir)}
