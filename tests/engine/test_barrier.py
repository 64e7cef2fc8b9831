"""The file barrier returns once the awaited file is ready, and otherwise fails within its timeout, naming the
file, the rank and how long it waited."""

from __future__ import annotations

import re
import threading
import time

import pytest

from lfm2_train.engine.barrier import BarrierTimeout, FileBarrier


def test_a_file_written_while_waiting_ends_the_wait(tmp_path, capsys):
    path = tmp_path / "shard.done.json"
    writer = threading.Timer(0.2, lambda: path.write_text("{}"))
    writer.start()
    barrier = FileBarrier(5.0, poll_s=0.05, label="cache_teacher")
    try:
        assert barrier.wait(lambda: path.read_text() if path.is_file() else None, path, rank=1, what="shard") == "{}"
    finally:
        writer.cancel()
    assert "cache_teacher: waiting for rank 1 to finish shard" in capsys.readouterr().out
    assert barrier.wait(lambda: 7, tmp_path / "other", rank=0) == 7  # ready at once: no wait, no message
    assert capsys.readouterr().out == ""


def test_a_missing_file_fails_within_the_timeout(tmp_path):
    path = tmp_path / "never.done.json"
    barrier = FileBarrier(0.3, poll_s=0.05, label="cache_teacher", hint="rerun to resume")
    start = time.monotonic()
    with pytest.raises(BarrierTimeout, match=rf"rank 3 to write {path}.*timeout of 0.3 s\. rerun to resume") as err:
        barrier.wait(lambda: None, path, rank=3)
    elapsed = time.monotonic() - start
    assert 0.3 <= elapsed < 0.3 + 0.5
    assert re.search(r"waited 0\.\d s", str(err.value))
    with pytest.raises(ValueError, match="positive timeout"):
        FileBarrier(0)
