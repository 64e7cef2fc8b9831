"""Atomic, verifiable, rotating training checkpoints.

A checkpoint is written into `.tmp-step-XXXXXXXX/`, every file is hashed into `checksums.json`, and only
then is the directory renamed to `step-XXXXXXXX/` — so a directory with the final name is complete by
construction, and a later corruption (a truncated file, a bad disk) is caught by the hashes: resume then
falls back to the previous complete checkpoint and says so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.format import sha256_file, write_json_atomic

log = logging.getLogger(__name__)
CHECKSUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _hash_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != CHECKSUMS}


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Complete-by-name checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """`write(tmp_dir)` fills the directory; we hash, rename into place and prune old ones."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        write_json_atomic(tmp / CHECKSUMS, _hash_tree(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()
        return final

    def _prune(self) -> None:
        dirs = self.step_dirs()
        for _, path in dirs[: max(len(dirs) - self.keep_last, 0)]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def verify(path: Path) -> str | None:
        """None if every file matches checksums.json, else a one-line reason."""
        sums_file = path / CHECKSUMS
        if not sums_file.is_file():
            return "no checksums.json"
        try:
            expected = json.loads(sums_file.read_text())
        except json.JSONDecodeError:
            return "checksums.json is not valid JSON"
        actual = _hash_tree(path)
        for name, digest in expected.items():
            if name not in actual:
                return f"{name} is missing"
            if actual[name] != digest:
                return f"{name} does not match its checksum"
        return None

    def latest_valid(self) -> Path | None:
        """Newest checkpoint that verifies; corrupted newer ones are reported and skipped."""
        for _, path in reversed(self.step_dirs()):
            problem = self.verify(path)
            if problem is None:
                return path
            msg = f"checkpoint {path} is corrupted ({problem}); falling back to the previous one"
            log.warning(msg)
            print(f"WARNING: {msg}")
        return None
