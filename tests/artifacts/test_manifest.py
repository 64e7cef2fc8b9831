"""Manifests: atomic JSON, format checks, and a mismatch explained key by key."""

from __future__ import annotations

import numpy as np
import pytest

from lfm2_train.artifacts import (
    DataFormatError,
    describe_differences,
    differences,
    read_manifest,
    save_npy_atomic,
    write_array_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from lfm2_train.data import format as data_format


def test_differences_name_each_changed_setting():
    cached = {"k": 32, "teacher": {"format": "lfm2", "weights_sha256": "1a2b3c4d5e6f" + "0" * 52},
              "tokenizer_fingerprint": "ab" * 32, "path": "/data/a", "gone": True}
    now = {"k": 16, "teacher": {"format": "lfm2", "weights_sha256": "9f8e7d6c5b4a" + "0" * 52},
           "tokenizer_fingerprint": "ab" * 32, "path": "/data/b", "new": [1, 2]}
    assert differences(cached, now) == [
        "gone: cached True, now (absent)",
        "k: cached 32, now 16",
        "new: cached (absent), now [1, 2]",
        "path: cached '/data/a', now '/data/b'",
        "teacher.weights_sha256: cached 1a2b3c4d5e6f…, now 9f8e7d6c5b4a…",
    ]
    assert describe_differences(cached, cached) == ""
    assert describe_differences({"w": "c" * 64 + "+nf4"}, {"w": "c" * 64}) == \
        "w: cached cccccccccccc…+nf4, now cccccccccccc…"


def test_read_manifest_checks_presence_json_and_format(tmp_path):
    path = tmp_path / "m.json"
    assert read_manifest(path) is None
    write_manifest(path, {"format": "x/1", "a": 1})
    assert read_manifest(path, format="x/1") == {"format": "x/1", "a": 1}
    with pytest.raises(DataFormatError, match="format 'x/1' is not 'x/2'"):
        read_manifest(path, format="x/2")
    path.write_text("{half")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        read_manifest(path)
    path.write_text("[1]")
    with pytest.raises(DataFormatError, match="not an object"):
        read_manifest(path)


def test_atomic_writers_leave_no_temporary_and_keep_the_old_file_on_failure(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"b": 1, "a": [1]})
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'
    write_text_atomic(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é\n"
    write_array_atomic(tmp_path / "x.bin", np.arange(3, dtype="<u2"))
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x00\x01\x00\x02\x00"
    save_npy_atomic(tmp_path / "x.npy", np.arange(3, dtype=np.float32))
    assert np.load(tmp_path / "x.npy").tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "a.json", {"bad": object()})
    assert (tmp_path / "a.json").read_text().startswith('{\n  "a"')  # the previous version, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "t.txt", "x.bin", "x.npy"]  # no temporary


def test_the_data_layer_reexports_the_same_objects():
    # `from lfm2_train.data.format import ...` keeps working and names the very same objects
    import lfm2_train.artifacts as artifacts

    for name in ("DataFormatError", "sha256_file", "write_json_atomic", "write_array_atomic"):
        assert getattr(data_format, name) is getattr(artifacts, name)
