"""Chat shards: the format holds exactly what the stages encode, the writer resumes and refuses like the
tokenize job, and the SFT and preference stages see bit-identical batches whether rows are tokenised in
memory, tokenised once into the cache, or written by the `chat_shards` job."""

from __future__ import annotations

import copy
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from data_pipelines.chat_shards import run as run_job
from data_pipelines.curriculum import build_order
from lfm2_train.data import chat_sources
from lfm2_train.data.chat_dataset import ChatRows, dataset_fingerprint, encode_rows, load_chat_rows, rows_fingerprint
from lfm2_train.data.chat_shards import (
    ChatSettings,
    ChatShards,
    ChatShardsError,
    encoding_identity,
    verify_chat_shards,
    write_chat_shards,
)
from lfm2_train.data.chat_sources import RowSource, cache_dir, cached_shards
from lfm2_train.data.format import MANIFEST, DataFormatError, ShardReader
from lfm2_train.data.jsonl_check import DataFileError
from lfm2_train.data.packed import split_documents
from lfm2_train.data.preference import PairStream, encode_pairs, pairs_hash
from lfm2_train.data.sft_stream import SFTStream
from lfm2_train.engine.distributed import Runtime
from lfm2_train.stages.preference import build_job as build_preference_job
from lfm2_train.stages.sft import build_job as build_sft_job
from lfm2_train.stages.sft import example_sequence
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

from .chat_batches import (
    DIGESTS,
    N_BATCHES,
    SCENARIOS,
    array_digest,
    batch_digest,
    chat_rows,
    compose_config,
    job_digests,
    pair_rows,
    scenario_overrides,
    write_jsonl,
)
from .chat_batches import write_inputs as _write_inputs

REFERENCE = json.loads(DIGESTS.read_text())

# scenario -> (the job's config, the stage overrides that read its output instead of stage.dataset)
JOBS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "sft_curriculum": ({"kind": "sft", "dataset": "{chat}", "seq_len": 128, "difficulty": {
        "source": "column", "method": "buckets", "n_buckets": 3}},
        ["data.order=difficulty-buckets", "data.val_fraction=0.1"]),
    "sft_epochs": ({"kind": "sft", "dataset": "{chat}", "seq_len": 128}, ["stage.epochs=2"]),
    "sft_bundled": ({"kind": "sft", "bundled_rows": 80, "seq_len": 128, "difficulty": {"source": "column"}},
                    ["data.order=difficulty-sort"]),
    "sft_mix": ({"kind": "sft", "dataset": "{chat}", "seq_len": 128}, ["stage.mix_pretrain=0.25",
                                                                       "stage.mix_data={mix}"]),
    "preference_chat": ({"kind": "preference", "dataset": "{pairs}", "seq_len": 64}, []),
    "preference_raw": ({"kind": "preference", "dataset": "{pairs}", "seq_len": 64, "plain_text": "raw"}, []),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _write_inputs(tmp_path_factory.mktemp("chat_inputs"))


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LFM2_TRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def _rows(rows: list[dict[str, Any]]) -> ChatRows:
    return ChatRows(rows, rows_fingerprint(rows), "rows")


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _job_output(name: str, inputs: dict[str, Path], out: Path) -> tuple[str, list[str]]:
    """Run the scenario's job into `out`; -> (kind, stage overrides reading it)."""
    job, stage = JOBS[name]
    job = json.loads(json.dumps(job).replace("{chat}", str(inputs["chat"])).replace("{pairs}", str(inputs["pairs"])))
    run_job({**job, "output_dir": str(out), "shard_tokens": 400})
    return job["kind"], [f"data.path={out}", *(o.replace("{mix}", str(inputs["mix"])) for o in stage)]


# ---------------------------------------------------------------------------------------------- format
def test_sft_shards_hold_exactly_what_encode_rows_makes(tmp_path, tok):
    rows = _rows(chat_rows())
    summary = write_chat_shards(tmp_path / "d", rows, tok, ChatSettings("sft", 128), shard_tokens=300)
    ref = encode_rows(tok, rows, max_length=129)
    assert summary["status"] == "complete" and summary["shards"] > 1 and summary["documents"] == len(ref.examples)
    shards = ChatShards(tmp_path / "d")
    assert [(e.input_ids, e.labels) for e in shards.sft_examples()] == [(e.input_ids, e.labels) for e in ref.examples]
    assert np.array_equal(shards.row_index, ref.row_index) and shards.skipped == ref.skipped
    assert shards.n_rows == len(rows) and shards.fingerprint == rows.fingerprint
    # the token files are pre-training's format: its reader sees the conversations as documents
    assert ShardReader(tmp_path / "d").document(41).tolist() == ref.examples[41].input_ids
    assert set(np.fromfile(tmp_path / "d" / "shard-00000.mask", dtype=np.uint8).tolist()) == {0, 1}
    verify_chat_shards(tmp_path / "d")


@pytest.mark.parametrize("plain_text", ["chat", "raw"])
def test_preference_shards_hold_exactly_what_encode_pairs_makes(tmp_path, tok, plain_text):
    rows = _rows(pair_rows())
    write_chat_shards(tmp_path / "d", rows, tok, ChatSettings("preference", 64, plain_text=plain_text),
                      shard_tokens=200)
    ref = encode_pairs(tok, rows, max_length=64, plain_text=plain_text)
    shards = ChatShards(tmp_path / "d")
    assert len(shards.manifest.shards) > 1
    assert shards.pairs() == ref.pairs and pairs_hash(shards.pairs()) == ref.data_hash()
    assert shards.skipped == ref.skipped == {"identical": 1}
    with pytest.raises(DataFormatError, match="holds preference chat shards, not sft"):
        shards.sft_examples()


def test_an_interrupted_write_resumes_to_the_same_bytes(tmp_path, tok):
    rows, settings = _rows(chat_rows()), ChatSettings("sft", 128)
    write_chat_shards(tmp_path / "full", rows, tok, settings, shard_tokens=300)
    part = write_chat_shards(tmp_path / "part", rows, tok, settings, shard_tokens=300, stop_after_shards=3)
    assert part["status"] == "stopped" and not (tmp_path / "part" / MANIFEST).exists()
    (tmp_path / "part" / "shard-00001.mask").write_bytes(b"\0")  # damaged: redone with everything after it
    (tmp_path / "part" / ".shard-00003.bin.tmp").write_bytes(b"x")  # a write the kill interrupted
    assert write_chat_shards(tmp_path / "part", rows, tok, settings, shard_tokens=300)["status"] == "complete"
    assert _files(tmp_path / "part") == _files(tmp_path / "full")
    again = write_chat_shards(tmp_path / "full", rows, tok, settings, shard_tokens=300)
    assert again["status"] == "already_complete"


def test_other_rows_are_refused_and_modified_files_named(tmp_path, tok, make_dataset):
    settings = ChatSettings("sft", 128)
    write_chat_shards(tmp_path / "d", _rows(chat_rows()), tok, settings)
    other = _rows(chat_rows()[:10])
    with pytest.raises(ChatShardsError, match="other rows or settings"):
        write_chat_shards(tmp_path / "d", other, tok, settings)
    assert write_chat_shards(tmp_path / "d", other, tok, settings, overwrite=True)["documents"] == 10
    mask = tmp_path / "d" / "shard-00000.mask"
    mask.write_bytes(bytes([1 - mask.read_bytes()[0]]) + mask.read_bytes()[1:])
    with pytest.raises(DataFormatError, match="shard-00000.mask does not match the sha256"):
        verify_chat_shards(tmp_path / "d")
    with pytest.raises(ChatShardsError, match="overwrite=true to rebuild"):
        write_chat_shards(tmp_path / "d", other, tok, settings)
    with pytest.raises(DataFormatError, match="not chat shards"):
        ChatShards(make_dataset(tmp_path / "pretrain", ["plain text"] * 3))
    with pytest.raises(ValueError, match="no usable conversation.*no_assistant_turn=1"):
        write_chat_shards(tmp_path / "e", _rows([{"messages": [{"role": "user", "content": "hi"}]}]), tok, settings)


# ---------------------------------------------------------------------------------------------- identical batches
def test_the_reference_digests_are_the_in_memory_path(inputs, tok):
    """What `chat_batch_digests.json` records: rows tokenised in memory, ordered and packed by the stage's rules."""
    cfg = compose_config(*scenario_overrides("sft_curriculum", inputs), Path("unused"))
    rows = load_chat_rows(inputs["chat"])
    encoded = encode_rows(tok, rows, max_length=129)
    difficulty = np.array(rows.column("difficulty"), dtype=np.float64)[encoded.row_index]
    order = build_order("buckets", difficulty, len(difficulty), n_buckets=3, seed=1234)
    train, _ = split_documents(len(encoded.examples), 0.1, 256, 1234)
    sequence, _ = example_sequence(encoded, train, order, cfg, 4)
    stream = SFTStream(encoded.examples, sequence, 128, tok.pad_token_id)
    assert array_digest(sequence) == REFERENCE["sft_curriculum"]["order"]
    assert [batch_digest(stream.next_batch(4)) for _ in range(N_BATCHES)] == REFERENCE["sft_curriculum"]["train"]

    pairs = encode_pairs(tok, load_chat_rows(inputs["pairs"]), max_length=64)
    train, _ = split_documents(len(pairs), 0.2, 256, 1234)
    stream = PairStream([pairs.pairs[i] for i in train], tok.pad_token_id, None, seed=1234, index=train)
    assert pairs.data_hash() == REFERENCE["preference_chat"]["pairs_hash"]
    assert [batch_digest(stream.next_batch(4)) for _ in range(N_BATCHES)] == REFERENCE["preference_chat"]["train"]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_jsonl_through_the_cache_gives_the_in_memory_batches(name, inputs, tmp_path):
    kind, overrides = scenario_overrides(name, inputs)
    assert job_digests(kind, compose_config(kind, overrides, tmp_path / "run")) == REFERENCE[name]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_jobs_shards_give_the_in_memory_batches(name, inputs, tmp_path):
    kind, overrides = _job_output(name, inputs, tmp_path / "shards")
    assert job_digests(kind, compose_config(kind, overrides, tmp_path / "run")) == REFERENCE[name]


@pytest.mark.parametrize("name", ["sft_mix", "sft_curriculum", "preference_chat"])
def test_resuming_mid_epoch_gives_the_same_batches(name, inputs, tmp_path):
    kind, overrides = _job_output(name, inputs, tmp_path / "shards")
    if kind == "sft":
        build = build_sft_job
    else:
        def build(cfg: Any, runtime: Runtime) -> Any:
            return build_preference_job(cfg, runtime)[0]
    first = build(compose_config(kind, overrides, tmp_path / "a"), Runtime()).train
    for _ in range(3):
        first.next_batch(4)
    state = first.state
    state = copy.deepcopy(state.to_dict() if hasattr(state, "to_dict") else state)
    expected = [batch_digest(first.next_batch(4)) for _ in range(3)]
    resumed = build(compose_config(kind, overrides, tmp_path / "b"), Runtime()).train
    resumed.load_state(state)
    assert [batch_digest(resumed.next_batch(4)) for _ in range(3)] == expected


# ---------------------------------------------------------------------------------------------- the cache
def test_a_second_run_reads_the_cache_without_tokenising(inputs, tmp_path, cache, monkeypatch):
    kind, overrides = scenario_overrides("sft_epochs", inputs)
    job = build_sft_job(compose_config(kind, overrides, tmp_path / "a"), Runtime())
    assert job.inputs["chat_shards"]["cache"] == "written"
    (directory,) = (cache / "chat_shards").iterdir()
    assert job.inputs["chat_shards"]["directory"] == str(directory) and directory.name.startswith("sft-")
    mtimes = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}

    calls = {"encode": 0}
    real_encode = LFM2Tokenizer.encode

    def counting(self: LFM2Tokenizer, *args: Any, **kwargs: Any) -> list[int]:
        calls["encode"] += 1
        return real_encode(self, *args, **kwargs)

    def no_parsing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the rows were parsed again")

    with monkeypatch.context() as patch:
        patch.setattr(LFM2Tokenizer, "encode", counting)
        patch.setattr(chat_sources, "load_chat_rows", no_parsing)
        assert job_digests(kind, compose_config(kind, overrides, tmp_path / "b")) == REFERENCE["sft_epochs"]
    assert calls["encode"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == mtimes

    changed = write_jsonl(tmp_path / "chat.jsonl", chat_rows()[:-1])  # other bytes: a new cache directory
    build_sft_job(compose_config(kind, [f"stage.dataset={changed}"], tmp_path / "c"), Runtime())
    assert len(list((cache / "chat_shards").iterdir())) == 2


def test_a_broken_jsonl_line_is_named_before_anything_is_written(tmp_path, cache):
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps(chat_rows()[0]) + "\n{not json\n")
    with pytest.raises(DataFileError, match=r"chat dataset .*chat\.jsonl, line 2: not valid JSON"):
        build_sft_job(compose_config("sft", [f"stage.dataset={bad}"], tmp_path / "run"), Runtime())
    assert not list(cache.rglob("shard-*"))


def test_a_damaged_cache_is_rebuilt(inputs, tmp_path, cache):
    kind, overrides = scenario_overrides("preference_chat", inputs)
    job_digests(kind, compose_config(kind, overrides, tmp_path / "a"))
    (directory,) = (cache / "chat_shards").iterdir()
    (directory / "shard-00000.rows").write_bytes(b"\0" * 8)
    job, _, _ = build_preference_job(compose_config(kind, overrides, tmp_path / "b"), Runtime())
    assert job.inputs["chat_shards"]["cache"] == "written"
    assert job.inputs["pairs_hash"] == REFERENCE["preference_chat"]["pairs_hash"]


class _Rank:
    """A stand-in runtime: one rank of several, counting barriers."""

    def __init__(self, rank: int) -> None:
        self.rank, self.barriers = rank, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        self.barriers += 1


def test_rank_zero_writes_and_the_other_ranks_wait(tmp_path, tok):
    rows = _rows(chat_rows())
    source = RowSource("rows", rows.fingerprint, lambda: rows)
    settings = ChatSettings("sft", 128)
    other = _Rank(1)
    with pytest.raises((FileNotFoundError, DataFormatError)):  # rank 1 never writes: it reads what rank 0 wrote
        cached_shards(source, tok, settings, other)
    assert other.barriers == 1

    def broken() -> ChatRows:
        raise OSError("disk gone")

    main = _Rank(0)
    with pytest.raises(OSError, match="disk gone"):  # rank 0 fails, but still releases the others
        cached_shards(RowSource("rows", rows.fingerprint, broken), tok, settings, main)
    assert main.barriers == 1
    shards, status = cached_shards(source, tok, settings, main)
    assert status == "written" and main.barriers == 2
    shards_1, _ = cached_shards(source, tok, settings, other)
    assert other.barriers == 2 and shards_1.directory == shards.directory and len(shards_1) == 42


def test_runs_started_together_share_one_whole_cache_directory(tmp_path, tok, cache):
    rows = _rows(chat_rows())
    source = RowSource("rows", rows.fingerprint, lambda: rows)
    settings = ChatSettings("sft", 128)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(cached_shards(source, tok, settings)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({shards.directory for shards, _ in results}) == 1
    (directory,) = (cache / "chat_shards").iterdir()  # the losers' temporaries are gone
    verify_chat_shards(directory)
    assert [e.input_ids for e in results[0][0].sft_examples()] == [e.input_ids for e in ChatShards(
        directory).sft_examples()]


def test_only_old_temporaries_of_killed_runs_are_removed(tmp_path, tok):
    rows = _rows(chat_rows())
    settings = ChatSettings("sft", 128)
    directory = cache_dir(encoding_identity(rows.fingerprint, tok, settings))
    old, recent = (directory.parent / f".{directory.name}.tmp-{x}" for x in ("old", "recent"))
    for d in (old, recent):
        d.mkdir(parents=True)
    os.utime(old, (0, 0))
    cached_shards(RowSource("rows", rows.fingerprint, lambda: rows), tok, settings)
    assert not old.exists() and recent.exists()  # a run writing right now keeps its temporary


def test_a_dataset_directory_under_a_hidden_directory_is_fingerprinted_by_its_files(tmp_path):
    a, b = tmp_path / ".data" / "a", tmp_path / ".data" / "b"
    for directory, rows in ((a, chat_rows()[:3]), (b, chat_rows()[3:6])):
        directory.mkdir(parents=True)
        write_jsonl(directory / "chat.jsonl", rows)
    (a / ".notes").write_text("not data")
    assert dataset_fingerprint(a) != dataset_fingerprint(b)  # they key different cache directories
    assert dataset_fingerprint(a) == load_chat_rows(a).fingerprint
