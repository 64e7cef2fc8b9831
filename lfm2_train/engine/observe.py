"""Observability: a JSONL metrics file (always), wandb (optional, offline by default), a progress bar,
and a loss-curve PNG at the end. Only rank 0 writes anything.

`metrics.jsonl` holds each step once: a run that resumes from the checkpoint of step N first moves the rows
logged after N (by the run that was killed) to `metrics.superseded.jsonl`, and a torn last line (a full
disk, a kill mid-write) is cut off there too. Readers skip a torn line with a warning rather than fail.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    def __init__(self, out_dir: str | Path, cfg: Any, *, total_steps: int, start_step: int, enabled: bool,
                 run_config: dict | None = None) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / "metrics.jsonl"
        self.cfg = cfg
        self.total_steps = total_steps
        self._wandb = None
        self._wandb_quiet = False
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _keep_rows_up_to(self.jsonl_path, start_step)
        # wandb's own environment variable wins over the config, as wandb users expect.
        mode = os.environ.get("WANDB_MODE") or cfg.logger.wandb_mode
        if cfg.logger.wandb and mode != "disabled":
            import wandb

            quiet = not cfg.logger.get("wandb_console", False)
            self._wandb = wandb.init(
                project=cfg.logger.project, name=cfg.logger.run_name, mode=mode,
                dir=str(self.out_dir), config=run_config, resume="allow",
                id=_stable_run_id(self.out_dir), reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off") if quiet else None,
            )
            self._wandb_quiet = quiet
        if cfg.trainer.progress_bar:
            self._bar = tqdm(total=total_steps, initial=start_step, desc=cfg.stage.name, dynamic_ncols=True,
                             mininterval=0.5)

    def log(self, step: int, metrics: dict[str, float], *, bar: bool = True) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        shown = {k: metrics[k] for k in ("loss", "lr", "tok/s", "val_loss") if k in metrics}
        if self._bar is not None and bar:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        elif self._bar is None and bar and shown:  # no bar: a line per logged step, so a long run is never silent
            values = " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            print(f"{self.cfg.stage.name} step {step}/{self.total_steps}: {values}", flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            run_dir = getattr(self._wandb, "dir", None)
            offline = getattr(getattr(self._wandb, "settings", None), "mode", None) == "offline"
            self._wandb.finish()
            self._wandb = None
            if self._wandb_quiet:
                where = Path(run_dir).parent if run_dir else self.out_dir / "wandb"
                print(f"wandb: {'offline ' if offline else ''}run in {where}"
                      + (f" (upload with: wandb sync {where})" if offline else ""), flush=True)


def _clean(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _stable_run_id(out_dir: Path) -> str:
    """Same output directory -> same wandb run id, so a resumed run continues its curves."""
    import hashlib

    return hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, 1-based numbers of the lines that are not a JSON object)."""
    records, bad = [], []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(number)
    return records, bad


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every well-formed row; a torn or foreign line is skipped and named in a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    records, bad = _parse_lines(path)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s) (line {', '.join(map(str, bad[:5]))}"
                      f"{', …' if len(bad) > 5 else ''}); a write was probably cut short", stacklevel=2)
    return records


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Before a run appends: drop torn lines and move rows after `step` (logged by a run that died before
    its next checkpoint, and about to be logged again) to `metrics.superseded.jsonl`."""
    if not path.is_file():
        return
    records, bad = _parse_lines(path)
    later = [r for r in records if r["step"] > step]
    if not later and not bad:
        return
    if later:
        with open(path.with_name("metrics.superseded.jsonl"), "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in later)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= step))
    os.replace(tmp, path)


def plot_losses(metrics_path: str | Path, out_png: str | Path, title: str = "") -> Path | None:
    """Train loss (and validation loss where measured) against step, as a PNG."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return None
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
