"""The chain's final table (printed) and Markdown report (written next to the step directories)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .runner import StepRecord, step_dirs
from .spec import ChainSpec

COLUMNS = ("step", "kind", "status", "steps", "seconds", "loss", "val_loss", "task_acc", "lm_loss")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(records: list[StepRecord]) -> list[list[str]]:
    rows = []
    for r in records:
        row = r.row()
        row["seconds"] = f"{row['seconds']:.1f}"
        rows.append([_fmt(row[c]) for c in COLUMNS])
    return rows


def format_table(records: list[StepRecord]) -> str:
    rows = [list(COLUMNS), *table(records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(records: list[StepRecord]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(row) + " |\n" for row in table(records))


def write_report(spec: ChainSpec, workdir: Path, records: list[StepRecord], total_seconds: float,
                 output: Path | None, legend: str = "") -> Path:
    """`report.md` (table, per-step loss curves, the task metric along the chain) + `chain_summary.json`."""
    dirs = step_dirs(spec, workdir)
    parts = [f"# Chain `{spec.name}`\n", f"{spec.description.strip()}\n" if spec.description else "",
             f"Chain file: `{spec.source}`. Total time {total_seconds:.0f} s "
             f"(this invocation; skipped steps report their original time).\n",
             "\n## Steps\n\n", markdown_table(records), f"\n{legend}\n" if legend else ""]
    evaluated = [r for r in records if r.metrics]
    if evaluated:
        parts.append("\n## Task metric along the chain\n\nChat arithmetic (`lfm2_train.tasks`), greedy, "
                     "exact answer; the same problems for every model.\n\n| step | accuracy | n | held-out LM loss |\n"
                     "|---|---|---|---|\n")
        parts += [f"| {r.name} | {r.metrics['accuracy']:.3f} | {r.metrics.get('n')} | "
                  f"{_fmt(r.metrics.get('lm_loss'))} |\n" for r in evaluated]
    curves = [(r.name, dirs[r.name] / "loss_curve.png") for r in records if (dirs[r.name] / "loss_curve.png").is_file()]
    if curves:
        parts.append("\n## Loss curves\n\n")
        parts += [f"### {name}\n\n![{name}]({os.path.relpath(png, workdir)})\n\n" for name, png in curves]
    if output is not None:
        parts.append(f"\n## Output\n\nThe chain's model: `{output}` (Hugging Face format).\n")
    report = workdir / "report.md"
    report.write_text("".join(parts))
    summary = {"chain": spec.name, "source": spec.source, "seconds": total_seconds,
               "output": str(output) if output else None,
               "steps": [{**r.row(), "fingerprint": r.fingerprint, "summary": r.summary, "metrics": r.metrics}
                         for r in records]}
    (workdir / "chain_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return report
