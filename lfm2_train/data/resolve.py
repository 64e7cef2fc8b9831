"""Where a stage's token shards are: `data.path` (with its tokenizer), or the bundled corpus prepared once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def resolve_dataset(data_cfg: DictConfig, runtime: Any = None, tokenizer: Path | None = None) -> tuple[Path, Path]:
    """(dataset dir, tokenizer dir) for a stage. `data.path=None` prepares the bundled corpus once
    (cached under ~/.cache/lfm2_train, keyed by the job config) so the quick start needs no download —
    tokenized with `tokenizer` (a model's own) when given, so that model can read it."""
    if data_cfg.path is None:
        from ..jobs import run_job

        prepared = run_job("bundled", {"tokenizer": tokenizer}, runtime=runtime)
        return Path(prepared["dataset"]), Path(prepared["tokenizer"])
    path = Path(data_cfg.path)
    if not path.is_dir():
        raise FileNotFoundError(f"data.path={path} does not exist")
    if data_cfg.tokenizer:
        tok = Path(data_cfg.tokenizer)
    elif (path / "tokenizer" / "tokenizer.json").is_file():
        tok = path / "tokenizer"
    else:
        raise FileNotFoundError(f"data.path={path} has no tokenizer/ directory; set data.tokenizer=<dir>")
    return path, tok
