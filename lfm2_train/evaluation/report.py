"""Results on disk: `eval_results.json` (everything) and `eval_results.md` (one row per task metric)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data.format import write_json_atomic
from .tasks import TaskResult


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def markdown_table(results: Sequence[TaskResult]) -> str:
    lines = ["| task | kind | metric | value | n |", "|---|---|---|---:|---:|"]
    for r in results:
        for metric, value in r.metrics.items():
            lines.append(f"| {r.name} | {r.kind} | {metric} | {_fmt(value)} | {r.n} |")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: Sequence[TaskResult], header: dict[str, Any]) -> dict[str, Any]:
    """Write the JSON, the Markdown table and per-example samples; -> the JSON document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {**header, "tasks": {r.name: {"kind": r.kind, "n": r.n, "seconds": round(r.seconds, 3), **r.metrics}
                               for r in results}}
    write_json_atomic(out_dir / "eval_results.json", doc)
    title = f"# Evaluation of `{header.get('model')}`\n\n"
    (out_dir / "eval_results.md").write_text(title + markdown_table(results))
    samples = [{"task": r.name, **s} for r in results for s in r.samples]
    if samples:
        with open(out_dir / "eval_samples.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps(s, default=str) + "\n")
    return doc
