"""Observability: a JSONL metrics file (always), wandb (optional, offline by default), a progress bar,
and a loss-curve PNG at the end. Only rank 0 writes anything."""

from __future__ import annotations

import json
import math
import os
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
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.logger.wandb and cfg.logger.wandb_mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.logger.project, name=cfg.logger.run_name, mode=cfg.logger.wandb_mode,
                dir=str(self.out_dir), config=run_config, resume="allow",
                id=_stable_run_id(self.out_dir), reinit="finish_previous",
            )
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
        if self._bar is not None and bar:
            shown = {k: metrics[k] for k in ("loss", "lr", "tok/s", "val_loss") if k in metrics}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _clean(v: float) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _stable_run_id(out_dir: Path) -> str:
    """Same output directory -> same wandb run id, so a resumed run continues its curves."""
    import hashlib

    return hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
