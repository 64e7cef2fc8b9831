"""Chat datasets: loading through `datasets`, skip counts, fingerprints and difficulty files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lfm2_train.data.chat_dataset import (
    bundled_rows,
    encode_rows,
    load_chat_rows,
    load_difficulty,
    save_difficulty,
)
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

GOOD = {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
BAD = [
    {"messages": [{"role": "user", "content": "no reply"}]},  # no_assistant_turn
    {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # unknown_role
    {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},  # empty_content
    {"messages": [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "y"}]},  # too_long
]


@pytest.fixture(scope="module")
def tok() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_encoded_with_skip_counts(tok, tmp_path):
    path = _write_jsonl(tmp_path / "chat.jsonl", [GOOD] * 3 + BAD)
    data = load_chat_rows(path, cache_dir=str(tmp_path / "cache"))
    enc = encode_rows(tok, data, max_length=128)
    assert len(enc.examples) == 3 and enc.row_index.tolist() == [0, 1, 2]
    assert dict(enc.skipped) == {"no_assistant_turn": 1, "unknown_role": 1, "empty_content": 1, "too_long": 1}
    assert "7 rows, 3 usable" in enc.describe()


def test_parquet_and_fingerprint_follow_the_bytes(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list([GOOD, GOOD]).to_parquet(str(path))
    a = load_chat_rows(path, cache_dir=str(tmp_path / "cache"))
    assert len(a) == 2 and len(encode_rows(tok, a, max_length=128).examples) == 2
    j1 = load_chat_rows(_write_jsonl(tmp_path / "a.jsonl", [GOOD]), cache_dir=str(tmp_path / "cache"))
    j2 = load_chat_rows(_write_jsonl(tmp_path / "b.jsonl", [GOOD, GOOD]), cache_dir=str(tmp_path / "cache"))
    assert j1.fingerprint != j2.fingerprint


def test_nothing_usable_is_an_error_naming_the_reasons(tok, tmp_path):
    data = load_chat_rows(_write_jsonl(tmp_path / "bad.jsonl", BAD), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no usable conversation.*no_assistant_turn=1"):
        encode_rows(tok, data, max_length=128)


def test_missing_messages_column_is_named(tok, tmp_path):
    data = load_chat_rows(_write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(KeyError, match="no column 'messages'"):
        encode_rows(tok, data, max_length=128)


def test_bundled_rows_are_reproducible_and_level_filtered():
    a, b = bundled_rows(50, 1), bundled_rows(50, 1)
    assert a.fingerprint == b.fingerprint and a.rows == b.rows
    easy = bundled_rows(50, 1, levels=[0])
    assert all(r["difficulty"] < 1 for r in easy.rows) and easy.fingerprint != a.fingerprint


def test_difficulty_file_round_trip_and_checks(tmp_path):
    path = save_difficulty(tmp_path / "d.json", [0.5, None, 1.0], dataset_fingerprint="abc", method="test")
    values, header = load_difficulty(path, dataset_fingerprint="abc", n_rows=3, require_complete=False)
    assert np.isnan(values[1]) and values[[0, 2]].tolist() == [0.5, 1.0] and header["n_scored"] == 2
    with pytest.raises(ValueError, match="scored other data"):
        load_difficulty(path, dataset_fingerprint="other")
    with pytest.raises(ValueError, match="has 3 rows, the dataset 4"):
        load_difficulty(path, n_rows=4, require_complete=False)
    with pytest.raises(ValueError, match="1 rows have no difficulty"):
        load_difficulty(path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="not a difficulty file"):
        load_difficulty(tmp_path / "x.json")
