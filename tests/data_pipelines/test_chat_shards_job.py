"""`python -m data_pipelines.chat_shards`: shards, scores and the order of the stage's curriculum rule, reruns,
refused options, and the Hydra command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.chat_shards import run
from data_pipelines.curriculum import build_order
from lfm2_train.data.chat_dataset import load_chat_rows, save_difficulty
from lfm2_train.data.chat_shards import ChatShards
from lfm2_train.data.format import load_order, load_scores
from lfm2_train.tasks import sft_conversations
from lfm2_train.tokenizer import LFM2Tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def chat(tmp_path: Path) -> Path:
    rows = sft_conversations(30, seed=2) + [{"messages": [{"role": "user", "content": "hi"}], "difficulty": 0.0}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_writes_shards_scores_and_the_stage_order(tmp_path, chat, hf_cache):
    out = tmp_path / "shards"
    cfg = {"dataset": str(chat), "seq_len": 64, "output_dir": str(out), "cache_dir": hf_cache,
           "difficulty": {"source": "column", "method": "buckets", "n_buckets": 4, "seed": 7}}
    summary = run(cfg)
    assert summary["status"] == "complete" and summary["documents"] == 30 and summary["rows"] == 31
    assert summary["skipped"] == {"no_assistant_turn": 1} and summary["order"]["name"] == "difficulty-buckets"
    shards = ChatShards(out)
    column = np.array(load_chat_rows(chat).column("difficulty"), dtype=np.float64)[shards.row_index]
    order, meta = load_order(out, "difficulty-buckets")
    assert np.array_equal(order, build_order("buckets", column, 30, n_buckets=4, seed=7))
    assert meta["seed"] == 7 and meta["difficulty"] == {"source": "column", "column": "difficulty"}
    scores, _ = load_scores(out, "difficulty")
    assert np.allclose(scores, column)
    assert LFM2Tokenizer.from_pretrained(out / "tokenizer").fingerprint() == shards.manifest.tokenizer_fingerprint
    assert run(cfg)["status"] == "already_complete"
    assert np.array_equal(load_order(out, "difficulty-buckets")[0], order)


def test_difficulty_file_is_checked_against_the_rows(tmp_path, chat, hf_cache):
    rows = load_chat_rows(chat)
    values = np.arange(len(rows), dtype=np.float64)[::-1]  # reverse row order: hardest first row
    good = save_difficulty(tmp_path / "d.json", values, dataset_fingerprint=rows.fingerprint, method="test")
    run({"dataset": str(chat), "seq_len": 64, "output_dir": str(tmp_path / "a"), "cache_dir": hf_cache,
         "difficulty": {"source": "file", "file": str(good), "name": "reverse"}})
    order, meta = load_order(tmp_path / "a", "reverse")
    assert ChatShards(tmp_path / "a").row_index[order].tolist() == list(range(29, -1, -1))
    assert meta["difficulty"]["method"] == "test" and len(meta["difficulty"]["file_sha256"]) == 64
    stale = save_difficulty(tmp_path / "s.json", values, dataset_fingerprint="0" * 64, method="test")
    with pytest.raises(ValueError, match="scored other data"):
        run({"dataset": str(chat), "seq_len": 64, "output_dir": str(tmp_path / "b"), "cache_dir": hf_cache,
             "difficulty": {"source": "file", "file": str(stale)}})


@pytest.mark.parametrize("cfg,match", [
    ({"kind": "dpo"}, "kind='dpo'"),
    ({"kind": "preference"}, "needs dataset"),
    ({"kind": "preference", "dataset": "x.jsonl", "difficulty": {"source": "column"}}, "shuffles its pairs"),
    ({"difficulty": {"source": "column", "method": "shuffle"}}, "difficulty.method"),
    ({"difficulty": {"source": "score"}}, "difficulty.source"),
    ({"seq_len": 1}, "seq_len=1"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, cfg, match):
    with pytest.raises(ValueError, match=match):
        run({"output_dir": str(tmp_path / "out"), **cfg})
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, chat):
    env = {**os.environ, "PYTHONPATH": str(REPO), "LFM2_TRAIN_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "data_pipelines.chat_shards", f"dataset={chat}", "seq_len=64",
           f"output_dir={tmp_path / 'out'}", "difficulty.source=column", f"hydra.run.dir={tmp_path / 'hydra'}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    summary = json.loads(out[out.index("{"):])
    assert summary["status"] == "complete" and summary["order"]["name"] == "difficulty-sort"
