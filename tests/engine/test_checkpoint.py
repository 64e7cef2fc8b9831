from __future__ import annotations

from pathlib import Path

from lfm2_train.engine.checkpoint import CheckpointManager


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
