"""Choose a merge by evaluation: expand candidate configurations, merge each, score, rank, publish the best.

The input models are scored with the same evaluation and ranked in the same table, so the table says
whether merging beat simply keeping the best input. The stage's output (`final/`) is always the best
*merge*; when an input scores better, the summary says so (`best_input_beats_merge`) rather than
silently publishing an unmerged checkpoint as the merge result.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MergeConfigError, parse_merge_config
from .runner import merge_checkpoints

Evaluation = Callable[[Path], dict[str, float]]


@dataclass
class Candidate:
    name: str
    config: dict[str, Any]  # a full mergekit-style configuration


@dataclass
class Row:
    name: str
    kind: str  # merge | input
    path: str
    metrics: dict[str, float] = field(default_factory=dict)
    setting: str = ""


def _set_path(config: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `parameters.t`, `models.1.parameters.weight`, ...; a bare name means a global parameter."""
    parts = dotted.split(".") if "." in dotted else ["parameters", dotted]
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise MergeConfigError(f"grid key {dotted!r}: {part!r} is not an index into a list of {len(node)}")
            node = node[int(part)]
        else:
            if part not in node or node[part] is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise MergeConfigError(f"grid key {dotted!r}: {last!r} is not an index into a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def _merge_dicts(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "_", text).strip("_")[:80] or "candidate"


def expand_candidates(base: dict[str, Any], variants: list[dict[str, Any]] | None = None,
                      grid: dict[str, list[Any]] | None = None) -> list[Candidate]:
    """Each variant (a partial configuration merged over `base`; `name` optional) times every point of
    `grid` ({dotted key: [values]}, e.g. {"t": [0.25, 0.5, 0.75]}); neither given = `base` alone."""
    variants = variants or [{}]
    grid = grid or {}
    for key, values in grid.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise MergeConfigError(f"grid {key!r} needs a non-empty list of values, got {values!r}")
    points = list(itertools.product(*grid.values())) if grid else [()]
    out, seen = [], set()
    for vi, variant in enumerate(variants):
        variant = dict(variant)
        label = str(variant.pop("name", "")) or (f"v{vi}" if len(variants) > 1 else "")
        for point in points:
            config = _merge_dicts(base, variant)
            parts = [label] if label else []
            for key, value in zip(grid, point):
                _set_path(config, key, value)
                parts.append(f"{key}={value}")
            name = _slug(",".join(parts) or str(config.get("merge_method", "merge")))
            while name in seen:
                name += "_"
            seen.add(name)
            out.append(Candidate(name, config))
    return out


def rank(rows: list[Row], metric: str, higher_is_better: bool) -> list[Row]:
    """Best first; rows without a finite value for `metric` go last."""
    def key(row: Row) -> tuple[int, float]:
        v = row.metrics.get(metric)
        if v is None or not math.isfinite(v):
            return (1, 0.0)
        return (0, -v if higher_is_better else v)

    return sorted(rows, key=key)


def write_tables(rows: list[Row], metric: str, higher_is_better: bool, out_dir: Path,
                 chosen: Row | None = None) -> tuple[Path, Path]:
    names = sorted({k for r in rows for k in r.metrics})
    csv_path, md_path = out_dir / "selection.csv", out_dir / "selection.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["rank", "name", "kind", *names, "setting", "path"])
        for i, r in enumerate(rows, start=1):
            w.writerow([i, r.name, r.kind, *(r.metrics.get(n, "") for n in names), r.setting, r.path])
    arrow = "higher is better" if higher_is_better else "lower is better"
    lines = [f"# Merge selection by `{metric}` ({arrow})", "",
             "| rank | name | kind | " + " | ".join(names) + " |",
             "|---:|---|---|" + "---:|" * len(names)]
    for i, r in enumerate(rows, start=1):
        vals = [f"{r.metrics[n]:.6g}" if n in r.metrics else "" for n in names]
        lines.append(f"| {i} | {r.name} | {r.kind} | " + " | ".join(vals) + " |")
    merges = [r for r in rows if r.kind == "merge"]
    inputs = [r for r in rows if r.kind == "input"]
    chosen = chosen or (merges[0] if merges else None)
    if chosen is not None:
        lines += ["", f"Chosen: **{chosen.name}** ({chosen.kind}, {metric} = {chosen.metrics.get(metric)})."]
    if merges and inputs:
        verdict = "beats" if rows.index(merges[0]) < rows.index(inputs[0]) else "does not beat"
        lines.append(f"The best merge {verdict} the best input ({inputs[0].name}, "
                     f"{metric} = {inputs[0].metrics.get(metric)}).")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def select_merge(candidates: list[Candidate], evaluate: Evaluation, metric: str, higher_is_better: bool,
                 out_dir: str | Path, *, include_inputs: bool = True, keep_candidates: bool = True, seed: int = 0,
                 base_dir: str | Path | None = None, select_inputs: bool = False,
                 **merge_kwargs: Any) -> dict[str, Any]:
    """Merge every candidate into `out_dir/candidates/<name>`, evaluate it (and the inputs), rank, write
    `selection.csv` / `selection.md`, and copy the best merge to `out_dir/final` — or, with `select_inputs`,
    the best model of the whole table, an unmerged input included, when merging did not pay."""
    out_dir = Path(out_dir)
    if not candidates:
        raise MergeConfigError("no merge candidates to select from")
    specs = [parse_merge_config(c.config, base_dir=base_dir, seed=seed) for c in candidates]  # all checked first
    final = out_dir / "final"
    if final.exists() and any(final.iterdir()) and not merge_kwargs.get("overwrite"):
        raise FileExistsError(f"{final} already exists; choose another output_dir")
    rows: list[Row] = []
    for cand, spec in zip(candidates, specs):
        path = out_dir / "candidates" / cand.name
        merge_checkpoints(spec, path, **merge_kwargs)
        metrics = _checked(evaluate(path), metric, cand.name)
        rows.append(Row(cand.name, "merge", str(path), metrics, json.dumps(spec.raw, sort_keys=True, default=str)))
        print(f"merge selection: {cand.name}: {metric} = {metrics[metric]:.6g}", flush=True)
    if include_inputs:
        seen = []
        for spec in specs:
            seen += [m for m in spec.models if m not in seen]
        for model in seen:
            metrics = _checked(evaluate(Path(model)), metric, model)
            rows.append(Row(_input_name(Path(model)), "input", model, metrics))
    ranked = rank(rows, metric, higher_is_better)
    best = ranked[0] if select_inputs else next(r for r in ranked if r.kind == "merge")
    best_input = next((r for r in ranked if r.kind == "input"), None)
    if final.exists():
        shutil.rmtree(final)
    if best.kind == "input":
        shutil.copytree(best.path, final, ignore=shutil.ignore_patterns("lfm2_train_manifest.json"))
        (final / "lfm2_train_manifest.json").write_text(json.dumps({"stage": "merge", "input": best.path}))
    elif keep_candidates:
        shutil.copytree(best.path, final)
    else:
        os.replace(best.path, final)
        shutil.rmtree(out_dir / "candidates", ignore_errors=True)
    manifest_path = final / "lfm2_train_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["selection"] = {"metric": metric, "higher_is_better": higher_is_better, "chosen": best.name,
                             "kind": best.kind, "metrics": best.metrics, "candidates": len(candidates)}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    csv_path, md_path = write_tables(ranked, metric, higher_is_better, out_dir, chosen=best)
    best_merge = next(r for r in ranked if r.kind == "merge")
    beaten = best_input is not None and ranked.index(best_input) < ranked.index(best_merge)
    return {"final": str(final), "chosen": best.name, "chosen_kind": best.kind, metric: best.metrics[metric],
            "candidates": len(candidates),
            "best_input": best_input.name if best_input else None,
            "best_input_metric": best_input.metrics.get(metric) if best_input else None,
            "best_input_beats_merge": beaten, "selection_csv": str(csv_path), "selection_md": str(md_path)}


def _input_name(model: Path) -> str:
    """A readable name for an input: `<run>/final` is called by its run directory, not `final`."""
    return f"{model.parent.name}/{model.name}" if model.name == "final" else model.name


def _checked(metrics: dict[str, float], metric: str, name: str) -> dict[str, float]:
    if metric not in metrics:
        raise KeyError(f"the evaluation of {name} returned {sorted(metrics)}, not the selection metric {metric!r}")
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------- evaluations
def validation_loss_evaluation(dataset_dir: str | Path, *, seq_len: int = 256, max_documents: int = 256,
                               batch_size: int = 8, seed: int = 1234, val_fraction: float = 0.02) -> Evaluation:
    """Per-token validation cross-entropy (`val_loss`, lower is better) on the held-out documents of a
    token-shard dataset, split exactly as the pretrain stage splits it."""
    from ..data.format import check_compatible, load_manifest
    from ..evaluation import validation_loss
    from ..model import LFM2ForCausalLM
    from .checks import tokenizer_fingerprint

    manifest = load_manifest(dataset_dir)

    def evaluate(path: Path) -> dict[str, float]:
        check_compatible(manifest, tokenizer_fingerprint=tokenizer_fingerprint(Path(path)), vocab_size=None,
                         source=str(dataset_dir))
        model = LFM2ForCausalLM.from_pretrained(path)
        r = validation_loss(model, dataset_dir, seq_len=seq_len, max_documents=max_documents, batch_size=batch_size,
                            seed=seed, val_fraction=val_fraction)
        return {"val_loss": r["loss"], "val_ppl": r["ppl"]}

    return evaluate


def arithmetic_evaluation(*, n: int = 64, seed: int = 0, max_new_tokens: int = 24, batch_size: int = 16,
                          levels: tuple[int, ...] | None = None) -> Evaluation:
    """Greedy chat-arithmetic accuracy (`arithmetic_accuracy`, higher is better); the checkpoint must ship
    its tokenizer."""
    from ..evaluation import arithmetic_accuracy
    from ..model import LFM2ForCausalLM
    from ..tokenizer import LFM2Tokenizer

    def evaluate(path: Path) -> dict[str, float]:
        if not (Path(path) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json: arithmetic accuracy needs the chat template")
        model = LFM2ForCausalLM.from_pretrained(path)
        r = arithmetic_accuracy(model, LFM2Tokenizer.from_pretrained(path), n=n, seed=seed, levels=levels,
                                max_new_tokens=max_new_tokens, batch_size=batch_size)
        return {"arithmetic_accuracy": r["accuracy"]}

    return evaluate
