"""Broken JSONL rows are named by file and line before any library parses them or any output is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm2_train.data.chat_dataset import load_chat_rows
from lfm2_train.data.jsonl_check import DataFileError, check_jsonl, jsonl_files, jsonl_problem
from lfm2_train.data.preference import load_preference_pairs
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

GOOD = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
PAIR = {"prompt": [{"role": "user", "content": "2 + 2?"}], "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}]}


def _lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("bad,why", [
    (b'{"messages": [oops', "line 3: not valid JSON"),
    (b'{"messages": "caf\xe9"}', "line 3: invalid UTF-8 at byte 17"),
    (b'[1, 2]', "line 3: a JSON list, expected an object"),
])
def test_the_first_bad_line_is_named(tmp_path, bad, why):
    ok = json.dumps(GOOD).encode()
    path = _lines(tmp_path / "x.jsonl", ok, b"", bad, ok)
    assert jsonl_problem(path).startswith(why)
    with pytest.raises(DataFileError, match=rf"chat dataset {path}, {why}"):
        check_jsonl(path, what="chat dataset")


def test_utf8_only_scan_ignores_json_syntax(tmp_path):
    path = _lines(tmp_path / "t.jsonl", b"not json at all", b"still fine")
    assert jsonl_problem(path, parse=False) is None
    assert jsonl_problem(path) is not None


def test_jsonl_files_of_a_directory_skip_hidden_ones(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "b.jsonl").write_text("broken\n")
    assert jsonl_files(tmp_path) == [tmp_path / "a.jsonl"]
    assert jsonl_files(tmp_path / "a.jsonl") == [tmp_path / "a.jsonl"]


def test_sft_and_preference_files_name_the_line(tmp_path):
    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    chat = _lines(tmp_path / "chat.jsonl", json.dumps(GOOD).encode(), b'{"messages": [}')
    with pytest.raises(DataFileError, match=rf"{chat}, line 2: not valid JSON"):
        load_chat_rows(chat, cache_dir=str(tmp_path / "hf"))
    pairs = _lines(tmp_path / "pairs.jsonl", json.dumps(PAIR).encode(), json.dumps(PAIR).encode()[:-1] + b"\xff}")
    with pytest.raises(DataFileError, match=rf"{pairs}, line 2: invalid UTF-8"):
        load_preference_pairs(pairs, tok, max_length=64, cache_dir=str(tmp_path / "hf"))
    folder = tmp_path / "folder"
    folder.mkdir()
    _lines(folder / "part-0.jsonl", json.dumps(GOOD).encode(), b"{")
    with pytest.raises(DataFileError, match=r"part-0.jsonl, line 2"):
        load_chat_rows(folder, cache_dir=str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())  # refused before datasets ran
