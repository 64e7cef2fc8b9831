"""Files and directories that appear whole or not at all.

Every writer goes through a temporary sibling on the same filesystem, fsyncs it, then renames it into
place, so a kill at any instant leaves the previous version or the new one — never half a file, and never
a directory with only some of its files. Temporary names are fixed (`.<name>.tmp`, `.<name>.tmp-<pid>`):
jobs that clean up after a crash recognise their own leftovers by them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np


def temp_sibling(dst: Path) -> Path:
    """A fresh, empty temporary directory next to `dst` (same filesystem, so the final rename is atomic)."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, dst: Path) -> Path:
    """Put the complete directory `tmp` at `dst`. Between the two renames `dst` is absent, never partial."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def _replace_with(path: Path, tmp: Path, mode: str, write: Callable[[IO[Any]], object]) -> None:
    """Write `tmp` with `write`, flush it to disk, then rename it over `path`. A writer that raises leaves
    `path` as it was and removes `tmp` (a kill leaves `tmp`, which the next write replaces)."""
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Indented, key-sorted JSON (plus a newline): readers never see half a file."""
    path = Path(path)

    def dump(f: IO[str]) -> None:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")

    _replace_with(path, path.with_name(f".{path.name}.tmp-{os.getpid()}"), "w", dump)


def write_text_atomic(path: str | Path, text: str) -> None:
    """UTF-8 text, through `.<name>.tmp`."""
    path = Path(path)
    _replace_with(path, path.with_name(f".{path.name}.tmp"), "w", lambda f: f.write(text))


def write_array_atomic(path: str | Path, array: np.ndarray) -> None:
    """The raw bytes of `array` (no header), through `.<name>.tmp`."""
    path = Path(path)
    _replace_with(path, path.with_name(f".{path.name}.tmp"), "wb",
                  lambda f: f.write(np.ascontiguousarray(array).tobytes()))


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    """`array` in NumPy's .npy format (shape and dtype in its header), through `.<name>.tmp`."""
    path = Path(path)
    _replace_with(path, path.with_name(f".{path.name}.tmp"), "wb", lambda f: np.save(f, array))
