"""Run a chain: each step in its own directory, skipped when done with the same inputs, resumed when not.

A step is *done* when `<workdir>/<NN-name>/chain_step.json` says so with the step's fingerprint: a hash of
its kind, its overrides / args (placeholders unresolved, so moving the work directory changes nothing), the
chain-wide overrides and the previous step's fingerprint. Changing a step therefore re-runs it and
everything after it; the stale directory is moved aside (never overwritten silently). A step that
was interrupted keeps its fingerprint marked `running`; re-running continues it in place (trainer stages
resume from their last complete checkpoint with `trainer.resume=auto`, data jobs resume or redo their
own atomic outputs).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifacts import model_dir_problem
from ..jobs import run_job
from .spec import ChainSpec, Step, substitute

MARKER = "chain_step.json"
# Data jobs that write into their own output directory (the others add files to a dataset directory).
_OWN_OUTPUT = {"train_tokenizer": "output_dir", "tokenize": "output_dir", "preference_pairs": "output_dir",
               "sft_difficulty": "output_dir", "chat_shards": "output_dir"}


@dataclass
class StepRecord:
    name: str
    kind: str
    fingerprint: str
    status: str  # done | skipped (done earlier) | interrupted | failed
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)  # task metric(s) measured by the chain

    def row(self) -> dict[str, Any]:
        s, m = self.summary, self.metrics
        return {"step": self.name, "kind": self.kind, "status": self.status, "steps": s.get("steps"),
                "seconds": round(self.seconds, 1), "loss": s.get("loss"), "val_loss": s.get("val_loss"),
                "task_acc": m.get("accuracy"), "lm_loss": m.get("lm_loss")}


class ChainInterrupted(RuntimeError):
    """A step stopped before finishing (signal or debug stop); re-running the chain continues it."""


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def step_dirs(spec: ChainSpec, workdir: Path) -> dict[str, Path]:
    return {s.name: workdir / f"{i:02d}-{s.name}" for i, s in enumerate(spec.steps)}


def fingerprints(spec: ChainSpec, settings: list[str]) -> dict[str, str]:
    """Each step's identity: its own definition, the chain-wide settings and everything before it.

    Chaining over *all* earlier steps (not only the `{placeholders}` a step names) is deliberate: steps
    also depend on each other by name (a curriculum order file inside the shards directory, say), and a
    changed early step must never leave a later one looking done."""
    out: dict[str, str] = {}
    previous = ""
    for step in spec.steps:
        previous = out[step.name] = _hash({"kind": step.kind, "overrides": step.overrides, "args": step.args,
                                           "common": spec.common, "settings": settings, "previous": previous})
    return out


def _read_marker(directory: Path) -> dict[str, Any] | None:
    path = directory / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # torn write: treat as absent (the step re-runs in place)


def _write_marker(directory: Path, payload: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    tmp.replace(directory / MARKER)


def _move_aside(directory: Path, log: Callable[[str], None]) -> None:
    n = 1
    while directory.with_name(f"{directory.name}.stale-{n}").exists():
        n += 1
    target = directory.with_name(f"{directory.name}.stale-{n}")
    directory.rename(target)
    log(f"  inputs of {directory.name} changed: previous outputs moved to {target.name}")


def model_dir_of(summary: dict[str, Any], directory: Path) -> Path | None:
    """The model a step produced: the stage's reported `final`, else `<dir>/final`, else None. Only a complete
    model directory counts (`artifacts.model_dir_problem`), not one with a lone `config.json`."""
    final = summary.get("final")
    for candidate in ([Path(final)] if final else []) + [directory / "final", directory]:
        if model_dir_problem(candidate) is None:
            return candidate
    return None


@dataclass
class ChainRunner:
    """Runs `spec` under `workdir`. `run_stage(overrides)` composes and runs one lfm2_train stage;
    `evaluate(model_dir)` returns the task metrics for a model directory."""

    spec: ChainSpec
    workdir: Path
    run_stage: Callable[[list[str]], dict[str, Any]]
    evaluate: Callable[[Path], dict[str, Any]]
    settings: list[str] = field(default_factory=list)  # chain-wide overrides that change results (seed, ...)
    cosmetic: list[str] = field(default_factory=list)  # chain-wide overrides that do not (logger, progress bar)
    eval_key: str = ""  # identifies the evaluation settings: a skipped step is re-scored when they change
    log: Callable[[str], None] = print

    def run(self) -> list[StepRecord]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        dirs = step_dirs(self.spec, self.workdir)
        prints = fingerprints(self.spec, self.settings)
        records: list[StepRecord] = []
        for i, step in enumerate(self.spec.steps):
            directory, fp = dirs[step.name], prints[step.name]
            marker = _read_marker(directory)
            if marker and marker.get("fingerprint") == fp and marker.get("status") == "done":
                self.log(f"[{i + 1}/{len(self.spec.steps)}] {step.name}: done earlier with the same inputs, skipped")
                metrics = marker.get("metrics", {})
                if step.evaluate and marker.get("eval_key") != self.eval_key:  # scored with other settings
                    metrics = self._evaluate(step, marker.get("summary", {}), directory)
                    _write_marker(directory, {**marker, "metrics": metrics, "eval_key": self.eval_key})
                records.append(StepRecord(step.name, step.kind, fp, "skipped", marker.get("seconds", 0.0),
                                          marker.get("summary", {}), metrics))
                continue
            if directory.exists() and (marker is None or marker.get("fingerprint") != fp):
                if any(directory.iterdir()):
                    _move_aside(directory, self.log)
            resuming = marker is not None and marker.get("fingerprint") == fp
            self.log(f"[{i + 1}/{len(self.spec.steps)}] {step.name} ({step.kind})"
                     + (": resuming" if resuming else ""))
            _write_marker(directory, {"name": step.name, "kind": step.kind, "fingerprint": fp, "status": "running"})
            started = time.perf_counter()
            summary = self._run_step(step, directory, {**dirs, "out": directory})
            seconds = time.perf_counter() - started + (marker or {}).get("seconds", 0.0)
            if summary.get("status") == "interrupted":
                _write_marker(directory, {"name": step.name, "kind": step.kind, "fingerprint": fp,
                                          "status": "running", "seconds": seconds})
                records.append(StepRecord(step.name, step.kind, fp, "interrupted", seconds, summary))
                raise ChainInterrupted(f"step {step.name!r} stopped before finishing; run the same command again "
                                       f"to continue it (finished steps are skipped)")
            summary = {k: v for k, v in summary.items() if _jsonable(v)}
            metrics = self._evaluate(step, summary, directory) if step.evaluate else {}
            _write_marker(directory, {"name": step.name, "kind": step.kind, "fingerprint": fp, "status": "done",
                                      "seconds": seconds, "summary": summary, "metrics": metrics,
                                      "eval_key": self.eval_key})
            records.append(StepRecord(step.name, step.kind, fp, "done", seconds, summary, metrics))
        return records

    def _evaluate(self, step: Step, summary: dict[str, Any], directory: Path) -> dict[str, Any]:
        model = model_dir_of(summary, directory)
        if model is None:
            raise RuntimeError(f"step {step.name!r} has evaluate: true but produced no model directory")
        metrics = self.evaluate(model)
        lm = f"; held-out LM loss {metrics['lm_loss']:.4f}" if metrics.get("lm_loss") is not None else ""
        self.log(f"  {step.name}: task accuracy {metrics.get('accuracy'):.3f} on {metrics.get('n')} problems{lm}")
        return metrics

    def _run_step(self, step: Step, directory: Path, dirs: dict[str, Path]) -> dict[str, Any]:
        if step.stage is not None:
            overrides = [f"stage={step.stage}", *self.cosmetic, *self.settings, *self.spec.common,
                         *substitute(step.overrides, dirs), f"output_dir={directory}"]
            return dict(self.run_stage(overrides))
        args = substitute(step.args, dirs)
        if step.job == "export":
            from .export import export_model

            return export_model(Path(args["model"]), directory, **{k: v for k, v in args.items() if k != "model"})
        key = _OWN_OUTPUT.get(step.job)
        if key:
            args.setdefault(key, str(directory))
        if step.job != "tokenize":  # tokenize resumes its shards; the others redo an unfinished step's output
            args.setdefault("overwrite", True)
        if step.job in ("tokenize", "scoring"):
            args.setdefault("progress", False)
        result = run_job(step.job, args)
        return dict(result) if isinstance(result, dict) else {"result": result}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False

