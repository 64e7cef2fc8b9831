"""Atomic, verifiable, rotating training checkpoints.

A checkpoint is written into `.tmp-step-XXXXXXXX/`, listed in `checksums.json`, and only then is the directory
renamed to `step-XXXXXXXX/` — so a directory with the final name is complete by construction, and a later
corruption (a truncated file, a bad disk) is caught by the manifest: resume then falls back to the previous
complete checkpoint and says so.

Hashing every byte before the rename would put a full read of a multi-GB checkpoint on the critical path. So
`checksums.json` holds the SHA-256 of every small file (metadata, RNG, trainer state: under
`HASH_NOW_BYTES`) and the size of every large one (the model / optimizer shards); after the rename a
background thread hashes the large files into `checksums.deferred.json` (written atomically). `verify` checks
sizes always and those hashes whenever the sidecar exists (the trainer waits for it at the end of a run).

Two rules keep work from being lost:
- pruning never touches the checkpoint just written, nor anything newer than it: it only removes the
  oldest checkpoints *below* the newest one of this run;
- checkpoints that are not part of this run's history (corrupted ones resume skipped, the checkpoints of a
  run restarted with `trainer.resume=never`, or those newer than an explicitly chosen resume point) are moved
  into `set-aside/`, never deleted, so a later automatic resume cannot pick them up by mistake.

Nothing in a checkpoint is unpickled: RNG state is stored as tensors and plain containers, and every `.pt`
file is read with `torch.load(weights_only=True)`, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.format import sha256_file, write_json_atomic

log = logging.getLogger(__name__)
CHECKSUMS = "checksums.json"
DEFERRED = "checksums.deferred.json"  # hashes of the large files, written in the background after the rename
HASH_NOW_BYTES = 1 << 20
SET_ASIDE = "set-aside"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_DISK_FULL_TEXT = ("no space left on device", "os error 28")
_TORCH_WRITE_FAILED = "unexpected pos"  # torch's zip writer on a full disk: no errno, only this


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file and what to do."""


def rng_state() -> dict[str, Any]:
    """Every RNG the run uses, as tensors and plain containers only (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_tensors(path: Path, map_location: str = "cpu") -> Any:
    """`torch.load` restricted to tensors and plain containers: a crafted file cannot run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError (or RuntimeError on older versions) for foreign objects
        raise CheckpointError(
            f"{path} holds something other than tensors and plain containers ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}); refusing to unpickle it. A checkpoint written by this "
            f"framework never does: delete the checkpoint or resume from another one") from None


def refuse_foreign_objects(path: Path, allowed: frozenset[str] = frozenset()) -> None:
    """For files that a library loads with full unpickling (DeepSpeed's partitions): list the Python globals
    the pickle would import — a static scan, nothing is executed — and refuse any outside `allowed`."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        found = set(get_unsafe_globals_in_checkpoint(path))
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})") from None
    foreign = sorted(found - allowed)
    if foreign:
        raise CheckpointError(f"{path} would import {foreign[:5]} when unpickled; refusing to load it. A "
                              f"checkpoint written by this framework never does: delete the checkpoint or resume "
                              f"from another one")


def _files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in (CHECKSUMS, DEFERRED)]


def _hash_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file (a full, synchronous manifest)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in _files(root)}


def _manifest(root: Path) -> tuple[dict[str, Any], list[str]]:
    """(checksums.json content, the large files whose hashes are deferred)."""
    entries: dict[str, Any] = {}
    deferred = []
    for p in _files(root):
        name, size = str(p.relative_to(root)), p.stat().st_size
        if size < HASH_NOW_BYTES:
            entries[name] = sha256_file(p)
        else:
            entries[name] = {"size": size}
            deferred.append(name)
    return entries, deferred


def _hash_later(root: Path, names: list[str]) -> None:
    """Background: hash the large files of a committed checkpoint into the sidecar. A checkpoint pruned or set
    aside meanwhile simply ends the job."""
    try:
        write_json_atomic(root / DEFERRED, {name: sha256_file(root / name) for name in names})
    except OSError as err:
        log.info("deferred hashing of %s stopped: %s", root, err)


def rank_errors(err: BaseException) -> list[BaseException]:
    """The per-rank errors inside a torch.distributed.checkpoint `CheckpointException` (else just `err`)."""
    failures = getattr(err, "failures", None)
    if not isinstance(failures, dict):
        return [err]
    return [f[0] if isinstance(f, tuple) else f for f in failures.values()]


def _disk_full(err: BaseException, where: Path) -> bool:
    """Was `err` caused by a full disk? torch's writer loses the errno ("unexpected pos …"), so we also look
    at the message and at the free space left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if any(text in str(seen).lower() for text in _DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return False
    return _TORCH_WRITE_FAILED in str(err).lower() and free < (1 << 20)


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = max(int(keep_last), 1)
        self._hashers: list[threading.Thread] = []

    def step_dirs(self) -> list[tuple[int, Path]]:
        """Complete-by-name checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return sorted(found)

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp-step-{step:08d}"

    def save(self, step: int, write: Callable[[Path], None], commit: bool = True) -> Path:
        """`write(tmp_dir)` fills the directory; we list it, rename it into place and prune old ones.

        On failure the temporary directory is removed; a full disk is reported as such. `commit=False` stops
        after `write` (for writes that finish in the background: call `commit(step)` once they are done)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir(step)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write(tmp)
        except BaseException as err:
            self.fail(step, err)
            raise
        return self.commit(step) if commit else tmp

    def fail(self, step: int, err: BaseException) -> None:
        """Remove the partial checkpoint of a failed write; a full disk becomes a CheckpointError saying so."""
        full = any(isinstance(e, Exception) and _disk_full(e, self.root) for e in rank_errors(err))
        shutil.rmtree(self.tmp_dir(step), ignore_errors=True)
        if full:
            raise CheckpointError(f"No space left on device while writing checkpoint step {step} to "
                                  f"{self.root}; the partial checkpoint was removed. Free space (or lower "
                                  f"trainer.keep_last) and re-run to resume from the previous one") from err

    def commit(self, step: int) -> Path:
        """Manifest, atomic rename, prune; the large files are then hashed in the background."""
        tmp, final = self.tmp_dir(step), self.root / f"step-{step:08d}"
        try:
            entries, deferred = _manifest(tmp)
            write_json_atomic(tmp / CHECKSUMS, entries)
        except BaseException as err:
            self.fail(step, err)
            raise
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.prune(newest=step)
        if deferred:
            worker = threading.Thread(target=_hash_later, args=(final, deferred), name=f"hash-{final.name}",
                                      daemon=True)
            worker.start()
            self._hashers.append(worker)
        return final

    def abandon(self, step: int) -> None:
        """Remove the temporary directory of a write that failed on another rank or in the background."""
        shutil.rmtree(self.tmp_dir(step), ignore_errors=True)

    def wait(self) -> None:
        """Until every background hash has been written."""
        while self._hashers:
            self._hashers.pop().join()

    def prune(self, newest: int) -> None:
        """Keep `newest` and the `keep_last - 1` checkpoints just below it; never touch anything newer."""
        older = [(s, p) for s, p in self.step_dirs() if s < newest]
        for _, path in older[: max(len(older) - (self.keep_last - 1), 0)]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move a checkpoint out of the resume path without deleting it; returns where it went."""
        target_dir = self.root / SET_ASIDE
        target_dir.mkdir(parents=True, exist_ok=True)
        target, n = target_dir / path.name, 1
        while target.exists():
            n += 1
            target = target_dir / f"{path.name}.{n}"
        os.replace(path, target)
        msg = f"checkpoint {path.name} {reason}: moved to {target}"
        log.warning(msg)
        print(f"WARNING: {msg}")
        return target

    @staticmethod
    def verify(path: Path) -> str | None:
        """None if every file matches checksums.json (and the deferred hashes, when written), else a reason."""
        sums_file = path / CHECKSUMS
        if not sums_file.is_file():
            return "no checksums.json"
        try:
            expected = json.loads(sums_file.read_text())
        except json.JSONDecodeError:
            return "checksums.json is not valid JSON"
        try:
            later = json.loads((path / DEFERRED).read_text()) if (path / DEFERRED).is_file() else {}
        except json.JSONDecodeError:
            return f"{DEFERRED} is not valid JSON"
        for name, entry in expected.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            digest = entry if isinstance(entry, str) else later.get(name)
            if isinstance(entry, dict) and file.stat().st_size != entry.get("size"):
                return f"{name} does not match its checksum (size {file.stat().st_size}, expected {entry.get('size')})"
            if digest is not None and sha256_file(file) != digest:
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

    def retire_after(self, step: int, reason: str) -> list[Path]:
        """Set aside every checkpoint newer than `step` (not part of the run that continues from `step`)."""
        return [self.set_aside(path, reason) for s, path in self.step_dirs() if s > step]
