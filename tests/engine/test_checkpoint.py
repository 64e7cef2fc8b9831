from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from lfm2_train.engine.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_tensors,
    refuse_foreign_objects,
    rng_state,
    set_rng_state,
)


def _write(text: str):
    def write(d: Path) -> None:
        (d / "a.txt").write_text(text)
        (d / "sub").mkdir()
        (d / "sub" / "b.bin").write_bytes(text.encode() * 3)
    return write


def test_atomic_save_keep_last_and_verify(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        path = mgr.save(step, _write(f"step {step}"))
        assert path.name == f"step-{step:08d}"
    assert [s for s, _ in mgr.step_dirs()] == [20, 30]
    assert not list(tmp_path.glob(".tmp-*"))
    assert mgr.latest_valid() == tmp_path / "step-00000030"


def test_corrupted_latest_falls_back_and_says_so(tmp_path, capsys):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, _write("one"))
    mgr.save(2, _write("two"))
    (tmp_path / "step-00000002" / "sub" / "b.bin").write_bytes(b"truncated")
    assert mgr.latest_valid() == tmp_path / "step-00000001"
    assert "step-00000002 is corrupted (sub/b.bin does not match its checksum)" in capsys.readouterr().out
    (tmp_path / "step-00000001" / "checksums.json").unlink()
    assert mgr.latest_valid() is None


def test_unfinished_temporary_directory_is_never_resumed(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _write("one"))
    (tmp_path / ".tmp-step-00000002").mkdir()
    assert mgr.latest_valid() == tmp_path / "step-00000001"


# ---------------------------------------------------------------------------------------------- pruning
def test_corrupt_newer_checkpoints_never_cost_the_one_just_written(tmp_path):
    """Newer checkpoints that are corrupt (or of another run) used to win the keep_last ranking, so each new
    checkpoint was deleted right after it was written."""
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (100, 200):
        mgr.save(step, _write(f"old {step}"))
    (tmp_path / "step-00000100" / "a.txt").write_text("bit rot")
    (tmp_path / "step-00000200" / "a.txt").write_text("bit rot")
    path = mgr.save(10, _write("new 10"))
    assert path.is_dir() and CheckpointManager.verify(path) is None
    mgr.save(20, _write("new 20"))
    mgr.save(30, _write("new 30"))
    # keep_last=2 among this run's checkpoints (<= the newest written); newer foreign ones are not touched
    assert [s for s, _ in mgr.step_dirs()] == [20, 30, 100, 200]


def test_prune_keeps_newest_and_the_ones_just_below(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3, 4, 5):
        mgr.save(step, _write(str(step)))
    assert [s for s, _ in mgr.step_dirs()] == [3, 4, 5]


def test_retire_after_moves_checkpoints_aside_without_deleting(tmp_path, capsys):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2, 3):
        mgr.save(step, _write(str(step)))
    moved = mgr.retire_after(1, "failed verification")
    assert [s for s, _ in mgr.step_dirs()] == [1]
    assert sorted(p.name for p in moved) == ["step-00000002", "step-00000003"]
    assert all(CheckpointManager.verify(p) is None for p in moved)  # intact, only out of the way
    assert "step-00000002 failed verification: moved to" in capsys.readouterr().out
    mgr.save(2, _write("again"))
    mgr.retire_after(1, "again")  # a second set-aside of the same name does not overwrite the first
    assert (tmp_path / "set-aside" / "step-00000002.2").is_dir()


# ---------------------------------------------------------------------------------------------- full disk
def test_full_disk_is_named_and_the_partial_checkpoint_removed(tmp_path):
    mgr = CheckpointManager(tmp_path)

    def fill(d: Path) -> None:
        (d / "model.bin").write_bytes(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match=r"No space left on device while writing checkpoint step 7 to "):
        mgr.save(7, fill)
    assert not list(tmp_path.glob(".tmp-*")) and not mgr.step_dirs()


def test_torch_zip_writer_error_on_a_really_full_disk(tmp_path):
    """torch.save on a full filesystem raises 'unexpected pos … vs …' without an errno; on a real 256 KiB tmpfs
    the message still says what happened and nothing is left behind."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        mgr = CheckpointManager(mnt / "checkpoints")
        with pytest.raises(CheckpointError, match="No space left on device while writing checkpoint step 3"):
            mgr.save(3, lambda d: torch.save({"w": torch.zeros(200_000)}, d / "optimizer.pt"))
        assert not list((mnt / "checkpoints").glob(".tmp-*"))
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_other_write_errors_propagate_unchanged(tmp_path):
    mgr = CheckpointManager(tmp_path)

    def broken(d: Path) -> None:
        raise KeyError("not a disk problem")

    with pytest.raises(KeyError, match="not a disk problem"):
        mgr.save(1, broken)
    assert not list(tmp_path.glob(".tmp-*"))


# ---------------------------------------------------------------------------------------------- no unpickling
class _Planted:
    """Unpickling this object would create a marker file: what a crafted checkpoint file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_tensors(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"python": _Planted(str(marker))}, tmp_path / "rng.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_tensors(tmp_path / "rng.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="would import"):
        refuse_foreign_objects(tmp_path / "rng.pt", frozenset({"deepspeed.runtime.zero.config.ZeroStageEnum"}))
    assert not marker.exists()
