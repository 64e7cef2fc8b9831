"""Difficulty scorers: model loss equals the naive per-document loss, heuristics order sanely, external files
map to the right documents, and scores are refused once the shards they were computed for change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf.errors import ConfigKeyError

from data_pipelines import scoring
from data_pipelines.scoring import (
    ExternalScorer,
    ModelLossScorer,
    available_scorers,
    normalize_scores,
    register_scorer,
    run,
)
from lfm2_train.data.format import DataFormatError, Manifest, ShardReader, load_manifest, load_scores, write_shard
from lfm2_train.data.packing import longest_with_shortest
from lfm2_train.model import LFM2ForCausalLM, get_preset

SEP = 7


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box they lose 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_dataset(directory: Path, docs: list[list[int]], docs_per_shard: int = 3, vocab: int = 512) -> Path:
    """Shards of `docs` (the separator is appended to each), plus a manifest: a real dataset directory."""
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, lo in enumerate(range(0, len(docs), docs_per_shard)):
        chunk = [np.array([*d, SEP], dtype=np.uint16) for d in docs[lo:lo + docs_per_shard]]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in chunk])]).astype(np.int64)
        shards.append(write_shard(directory, f"shard-{s:05d}", np.concatenate(chunk), offsets))
    Manifest(tokenizer_fingerprint="test", vocab_size=vocab, dtype="uint16", separator_id=SEP,
             shards=shards).save(directory)
    return directory


def random_docs(n: int, seed: int, lo: int = 0, hi: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(8, 512, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------------------------- model_loss
def test_model_loss_equals_naive_per_document_loss(tmp_path: Path) -> None:
    docs = random_docs(11, seed=1, lo=1, hi=30) + [[], list(range(8, 58))]  # separator-only and truncated docs
    data = make_dataset(tmp_path / "data", docs)
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny")).eval()
    ckpt = tmp_path / "ref"
    model.save_pretrained(ckpt)
    max_length = 32
    summary = run({"dataset": str(data), "scorer": "model_loss", "progress": False,
                   "model_loss": {"checkpoint": str(ckpt), "max_length": max_length, "max_tokens_per_batch": 64,
                                  "device": "cpu", "head_chunk_tokens": 16}})
    scores, meta = load_scores(data, "model_loss")
    assert summary["num_documents"] == len(docs) and meta["scorer"] == "model_loss"
    assert meta["scorer_meta"]["checkpoint"] == str(ckpt) and meta["scorer_meta"]["max_length"] == max_length

    reader = ShardReader(data)
    # The run really packed several documents per row (else the doc_ids masking would be untested).
    lengths = np.minimum(reader.doc_lengths(), max_length)
    assert max(len(row) for row in longest_with_shortest(lengths, max_length)) > 1
    with torch.inference_mode():
        for d in range(len(reader)):
            toks = torch.from_numpy(reader.document(d)[:max_length].astype(np.int64))
            if len(toks) < 2:
                assert scores[d] == 0.0
                continue
            logits = model(toks[None])[0]
            naive = F.cross_entropy(logits[:-1].float(), toks[1:]).item()
            assert abs(scores[d] - naive) <= 1e-5, (d, scores[d], naive)


def test_model_loss_scorer_on_a_subset_and_bad_sizes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(6, seed=2, lo=2, hi=20))
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny"))
    reader = ShardReader(data)
    full = ModelLossScorer(model, max_length=24, max_tokens_per_batch=48).score(reader, np.arange(6))
    sub = ModelLossScorer(model, max_length=24, max_tokens_per_batch=24).score(reader, np.array([4, 1]))
    np.testing.assert_allclose(sub, full[[4, 1]], atol=1e-5)
    assert len(set(full.tolist())) == 6  # real, distinct losses
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        ModelLossScorer(model, max_length=64, max_tokens_per_batch=32)
    with pytest.raises(ValueError, match="checkpoint"):
        run({"dataset": str(data), "scorer": "model_loss"})


# ---------------------------------------------------------------------------------------------- heuristics
def test_compression_and_length_order_synthetic_docs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    repetitive = [11, 12, 13, 14] * 50
    random = rng.integers(8, 512, size=200).tolist()
    short = [9, 10, 11]
    data = make_dataset(tmp_path / "data", [random, repetitive, short])
    run({"dataset": str(data), "scorer": "compression", "progress": False})
    run({"dataset": str(data), "scorer": "length"})
    comp, meta = load_scores(data, "compression")
    assert comp[1] < comp[0]  # repetitive is easier than random
    assert comp[1] < 0.3 < 0.7 < comp[0]  # ids < 512 as uint16: the high byte is almost free
    assert meta["scorer_meta"]["level"] == 9
    length, _ = load_scores(data, "length")
    np.testing.assert_array_equal(length, [200, 200, 3])  # separator not counted
    reader = ShardReader(data)
    many = np.tile(np.arange(3), 5)
    parallel = scoring.CompressionScorer(workers=2, chunk=4).score(reader, many)  # 4 tasks over 2 processes
    np.testing.assert_array_equal(parallel, comp[many])


def test_combo_weights_normalized_components(tmp_path: Path) -> None:
    docs = [[9] * 50, np.random.default_rng(1).integers(8, 512, 5).tolist(), [9, 10] * 20]
    data = make_dataset(tmp_path / "data", docs)
    run({"dataset": str(data), "scorer": "length"})
    run({"dataset": str(data), "scorer": "combo", "name": "mix",
         "combo": {"saved": {"length": 1.0}, "components": {"compression": 2.0}, "normalize": "rank"}})
    mix, meta = load_scores(data, "mix")
    length, _ = load_scores(data, "length")
    comp = scoring.CompressionScorer().score(ShardReader(data), np.arange(3))
    expected = normalize_scores(length, "rank") + 2 * normalize_scores(comp, "rank")
    np.testing.assert_allclose(mix, expected, rtol=1e-6)
    assert meta["scorer_meta"]["saved"] == {"length": 1.0}
    np.testing.assert_allclose(normalize_scores(np.array([5.0, 1.0, 5.0, 3.0]), "rank"), [1.0, 0.0, 1.0, 0.5])


# ---------------------------------------------------------------------------------------------- external
def test_external_jsonl_by_index_success_rate(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(5, seed=3, lo=1))
    path = tmp_path / "ensemble.jsonl"
    rates = [0.9, 0.25, 0.5, 1.0, 0.0]
    order = [3, 0, 4, 1, 2]  # file rows in any order
    path.write_text("".join(json.dumps({"doc": i, "success": rates[i]}) + "\n" for i in order))
    run({"dataset": str(data), "scorer": "external", "name": "ensemble",
         "external": {"path": str(path), "key_field": "doc", "value_field": "success", "higher_is_easier": True}})
    scores, _ = load_scores(data, "ensemble")
    np.testing.assert_allclose(scores, 1.0 - np.array(rates), atol=1e-7)


def test_external_csv_by_document_id(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(4, seed=4, lo=1))
    ids = tmp_path / "ids.txt"
    ids.write_text("a\nb\nc\nd\n")
    table = tmp_path / "scores.csv"
    table.write_text("id,difficulty\nc,3.5\nzz,9\na,1.5\nd,0\nb,2\n")  # "zz" is another corpus's item
    scorer = ExternalScorer(table, key_field="id", value_field="difficulty", ids_path=ids)
    np.testing.assert_array_equal(scorer.score(ShardReader(data), np.arange(4)), [1.5, 2.0, 3.5, 0.0])
    assert scorer.describe()["unknown_ids_ignored"] == 1


def test_external_missing_keys_error_or_fill(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(6, seed=5, lo=1))
    path = tmp_path / "partial.jsonl"
    path.write_text("".join(json.dumps({"index": i, "score": float(i)}) + "\n" for i in (0, 1, 3, 5)))
    cfg = {"dataset": str(data), "scorer": "external", "external": {"path": str(path)}}
    with pytest.raises(ValueError, match=r"2 of 6 documents have no value; first missing: document index 2"):
        run(cfg)
    cfg["external"]["fill_missing"] = 9.0
    run(cfg)
    np.testing.assert_array_equal(load_scores(data, "external")[0], [0, 1, 9, 3, 9, 5])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"index": 6, "score": 1.0}) + "\n")
    with pytest.raises(ValueError, match="out of range"):
        ExternalScorer(bad).score(ShardReader(data), np.arange(6))


def test_external_npy_is_positional(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(3, seed=6, lo=1))
    np.save(tmp_path / "v.npy", np.array([0.5, 0.1, 0.7]))
    got = ExternalScorer(tmp_path / "v.npy").score(ShardReader(data), np.array([2, 0]))
    np.testing.assert_allclose(got, [0.7, 0.5], rtol=1e-6)
    np.save(tmp_path / "short.npy", np.array([0.5]))
    with pytest.raises(ValueError, match="one value per document"):
        ExternalScorer(tmp_path / "short.npy").score(ShardReader(data), np.arange(3))


# ---------------------------------------------------------------------------------------------- registry / job
class _ReverseIndexScorer:
    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        return (len(reader) - np.asarray(doc_indices)).astype(np.float32)


def test_plugin_scorer_registry(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(4, seed=7, lo=1))
    register_scorer("test_reverse_index", lambda cfg: _ReverseIndexScorer(), overwrite=True)
    assert "test_reverse_index" in available_scorers()
    run({"dataset": str(data), "scorer": "test_reverse_index"})
    np.testing.assert_array_equal(load_scores(data, "test_reverse_index")[0], [4, 3, 2, 1])
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("compression", lambda cfg: _ReverseIndexScorer())
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        run({"dataset": str(data), "scorer": "nope"})
    with pytest.raises(ConfigKeyError, match="typo_key"):
        run({"dataset": str(data), "typo_key": 1})


def test_scores_refused_after_manifest_changes(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(4, seed=8, lo=1))
    run({"dataset": str(data), "scorer": "length"})
    load_scores(data, "length")  # fine while the shards are the ones scored
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run({"dataset": str(data), "scorer": "length"})
    manifest = load_manifest(data)
    manifest.extra["retokenized"] = True
    manifest.save(data)
    with pytest.raises(DataFormatError, match="manifest hash mismatch"):
        load_scores(data, "length")
    run({"dataset": str(data), "scorer": "length", "overwrite": True})  # rescoring repairs it
    assert len(load_scores(data, "length")[0]) == 4


def test_modified_shard_is_refused_before_scoring(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", random_docs(4, seed=9, lo=1))
    with open(data / "shard-00000.bin", "r+b") as f:
        f.write(b"\x01\x02")
    with pytest.raises(DataFormatError, match="modified"):
        run({"dataset": str(data), "scorer": "length"})
