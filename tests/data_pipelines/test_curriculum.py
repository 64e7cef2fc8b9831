"""Curriculum orders: sort follows the scores, buckets respect their boundaries, seeds behave, the meta
carries what the trainer needs, and orders are refused once the shards change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException

from data_pipelines import curriculum, scoring
from data_pipelines.curriculum import run
from lfm2_train.data.curriculum_order import bucket_order, sort_order
from lfm2_train.data.format import DataFormatError, Manifest, ShardReader, load_manifest, load_order, write_shard
from lfm2_train.data.pacing import PacingConfig

REPO = Path(__file__).resolve().parents[2]
SEP = 7


def make_dataset(directory: Path, n_docs: int, docs_per_shard: int = 4, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = []
    for s, lo in enumerate(range(0, n_docs, docs_per_shard)):
        docs = [np.array([*rng.integers(8, 500, int(rng.integers(1, 9))), SEP], dtype=np.uint16)
                for _ in range(min(docs_per_shard, n_docs - lo))]
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
        shards.append(write_shard(directory, f"shard-{s:05d}", np.concatenate(docs), offsets))
    Manifest(tokenizer_fingerprint="test", vocab_size=512, dtype="uint16", separator_id=SEP,
             shards=shards).save(directory)
    return directory


class _FixedScorer:
    """Synthetic scorer: returns the values given in the job's `options.values`."""

    def __init__(self, values: list[float]) -> None:
        self.values = np.asarray(values, dtype=np.float32)

    def score(self, reader: ShardReader, doc_indices: np.ndarray) -> np.ndarray:
        return self.values[doc_indices]


scoring.register_scorer("test_fixed", lambda cfg: _FixedScorer(list(cfg.options["values"])), overwrite=True)


def scored(tmp_path: Path, values: list[float] | np.ndarray, docs_per_shard: int = 4) -> Path:
    data = make_dataset(tmp_path / "data", len(values), docs_per_shard)
    scoring.run({"dataset": str(data), "scorer": "test_fixed", "name": "fixed",
                 "options": {"values": [float(v) for v in values]}})
    return data


def test_sort_follows_scores_exactly(tmp_path: Path) -> None:
    values = np.random.default_rng(0).permutation(23).astype(float) / 7.0  # distinct scores
    data = scored(tmp_path, values)
    summary = run({"dataset": str(data), "scores": "fixed", "method": "sort", "seed": 3})
    order, meta = load_order(data, "fixed-sort")
    assert summary["name"] == "fixed-sort"
    np.testing.assert_array_equal(order, np.argsort(values))
    assert meta["method"] == "sort" and meta["seed"] == 3 and meta["scorer"] == "test_fixed"
    assert meta["scores_sha256"]  # ties the order to this exact score file


def test_sort_ties_are_seeded(tmp_path: Path) -> None:
    values = np.repeat([2.0, 0.0, 1.0], 10)  # heavy ties: only the seed orders them
    a, b, c = sort_order(values, 0), sort_order(values, 0), sort_order(values, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for order in (a, c):
        assert np.all(np.diff(values[order]) >= 0)
        np.testing.assert_array_equal(np.sort(order[:10]), np.arange(10, 20))  # the zeros come first
    assert not np.array_equal(a[:10], np.arange(10, 20))  # ties are not left in index order


def test_buckets_respect_boundaries_and_seed(tmp_path: Path) -> None:
    values = np.random.default_rng(1).normal(size=40)
    data = scored(tmp_path, values)
    run({"dataset": str(data), "scores": "fixed", "method": "buckets", "n_buckets": 4, "seed": 5})
    order, meta = load_order(data, "fixed-buckets")
    bounds = meta["bucket_bounds"]
    assert bounds == [0, 10, 20, 30, 40] and meta["n_buckets"] == 4
    ranked = np.argsort(values)
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        bucket = order[lo:hi]
        assert set(bucket.tolist()) == set(ranked[lo:hi].tolist())  # the right quantile
        assert meta["bucket_max_scores"][b] == pytest.approx(float(values[bucket].max()))
        if b + 1 < len(bounds) - 1:
            assert values[bucket].max() <= values[order[hi:bounds[b + 2]]].min()
    assert not np.array_equal(order, ranked)  # shuffled inside buckets, not sorted
    same = bucket_order(values.astype(np.float32), 4, 5)
    other = bucket_order(values.astype(np.float32), 4, 6)
    np.testing.assert_array_equal(order, same)
    assert not np.array_equal(same, other)
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        assert set(same[lo:hi].tolist()) == set(other[lo:hi].tolist())  # the seed only moves within buckets


def test_shuffle_baseline_needs_no_scores(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 30)
    run({"dataset": str(data), "method": "shuffle", "seed": 1})
    order, meta = load_order(data, "shuffle")
    np.testing.assert_array_equal(np.sort(order), np.arange(30))
    assert not np.array_equal(order, np.arange(30))
    run({"dataset": str(data), "method": "shuffle", "seed": 1, "name": "again"})
    run({"dataset": str(data), "method": "shuffle", "seed": 2, "name": "other"})
    np.testing.assert_array_equal(load_order(data, "again")[0], order)
    assert not np.array_equal(load_order(data, "other")[0], order)
    assert meta["scores"] is None and meta["shard_mean_scores"] is None
    assert sorted(meta["shard_order"]) == list(range(8))
    with pytest.raises(ValueError, match="needs scores"):
        run({"dataset": str(data), "method": "sort"})


def test_meta_holds_pacing_and_shard_order(tmp_path: Path) -> None:
    # 3 shards of 4 documents with means 5, 1, 3 -> easy -> hard shard order 1, 2, 0.
    values = [5, 5, 5, 5, 0, 1, 2, 1, 3, 3, 3, 3]
    data = scored(tmp_path, values)
    run({"dataset": str(data), "scores": "fixed", "method": "sort", "seed": 0, "name": "paced",
         "pacing": {"kind": "root", "start_fraction": 0.2, "full_at": 0.8}})
    _, meta = load_order(data, "paced")
    assert meta["shard_order"] == [1, 2, 0]
    assert meta["shard_order_names"] == ["shard-00001", "shard-00002", "shard-00000"]
    assert meta["shard_mean_scores"] == [5.0, 1.0, 3.0]
    assert PacingConfig.from_dict(meta["pacing"]) == PacingConfig(kind="root", start_fraction=0.2, full_at=0.8)
    with pytest.raises(ValueError, match="pacing kind"):
        run({"dataset": str(data), "scores": "fixed", "name": "bad", "pacing": {"kind": "cosine"}})
    with pytest.raises(FileExistsError):
        run({"dataset": str(data), "scores": "fixed", "method": "sort", "name": "paced"})


def test_order_and_scores_refused_after_manifest_changes(tmp_path: Path) -> None:
    data = scored(tmp_path, [3.0, 1.0, 2.0, 0.0, 4.0])
    run({"dataset": str(data), "scores": "fixed"})
    load_order(data, "fixed-sort")
    manifest = load_manifest(data)
    manifest.sources.append({"name": "late addition"})
    manifest.save(data)
    with pytest.raises(DataFormatError, match="manifest hash mismatch"):
        load_order(data, "fixed-sort")
    with pytest.raises(DataFormatError, match="manifest hash mismatch"):  # stale scores: no new order either
        run({"dataset": str(data), "scores": "fixed", "name": "new"})


def test_hydra_compose_and_cli(tmp_path: Path) -> None:
    data = scored(tmp_path, [0.5, 0.25, 0.75, 0.0, 1.0, 0.125])
    curriculum.register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="curriculum", overrides=[
            f"dataset={data}", "scores=fixed", "method=buckets", "n_buckets=2", "pacing.kind=step",
            "pacing.steps=[[0.3,0.5]]", "pacing.full_at=0.6"])
        with pytest.raises(ConfigCompositionException, match="n_bucket"):
            compose(config_name="curriculum", overrides=[f"dataset={data}", "n_bucket=2"])
    run(cfg)
    order, meta = load_order(data, "fixed-buckets")
    assert set(order[:3].tolist()) == {1, 3, 5} and meta["pacing"]["steps"] == [[0.3, 0.5]]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hydra_dir = f"hydra.run.dir={tmp_path / 'hydra'}"
    cmd = [sys.executable, "-m", "data_pipelines.scoring", f"dataset={data}", "scorer=length", hydra_dir]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    cmd = [sys.executable, "-m", "data_pipelines.curriculum", f"dataset={data}", "scores=length", "seed=4",
           hydra_dir]
    out = subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    assert json.loads(out[out.index("{"):])["name"] == "length-sort"
    lengths = ShardReader(data).doc_lengths()
    order, _ = load_order(data, "length-sort")
    assert np.all(np.diff(lengths[order]) >= 0)
