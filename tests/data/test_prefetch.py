"""Per-rank reading and prefetching: the same rows and states as one process reading everything, in order,
and a resume point that is the batch trained on, not the one waiting in the queue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm2_train.data.format import Manifest, ShardReader, write_shard
from lfm2_train.data.packed import DocumentStream
from lfm2_train.data.prefetch import RankBatches


@pytest.fixture
def reader(tmp_path):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, 500, size=int(n))) + [2] for n in rng.integers(0, 40, size=120)]
    flat = np.array([t for d in docs for t in d], dtype=np.uint16)
    shard = write_shard(tmp_path, "shard-00000", flat, np.cumsum([0] + [len(d) for d in docs]))
    Manifest("fp", 512, "uint16", 2, [shard]).save(tmp_path)
    return ShardReader(tmp_path)


def _stream(reader, seq_len=16):
    return DocumentStream(reader, np.random.default_rng(1).permutation(len(reader)), seq_len)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_reads_its_own_rows_and_ends_in_the_global_state(reader, world):
    whole = _stream(reader)
    ranks = [_stream(reader) for _ in range(world)]
    for _ in range(6):
        batch = whole.next_batch(8)
        parts = [s.next_local_batch(8, r, world) for r, s in enumerate(ranks)]
        for key in batch:
            assert torch.equal(torch.cat([p[key] for p in parts]), batch[key]), key
        assert all(s.state == whole.state for s in ranks)


def test_a_rank_never_reads_the_tokens_of_other_ranks_rows(reader, monkeypatch):
    stream, reads = _stream(reader), []
    original = reader.document
    monkeypatch.setattr(reader, "document", lambda i: reads.append(i) or original(i))
    stream.next_local_batch(8, 3, 4)  # the last 2 rows of 8
    assert 0 < len(reads) <= 2 * (16 + 1)  # at most one document read per token of its 2 rows


def test_exhaustion_consumes_nothing(reader):
    stream = _stream(reader, seq_len=64)
    with pytest.raises(StopIteration):
        while True:
            before = stream.state.to_dict()
            stream.next_local_batch(4, 1, 2)
    assert stream.state.to_dict() == before


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_prefetched_batches_and_states_equal_the_synchronous_ones(reader, prefetch):
    plain, ahead = RankBatches(_stream(reader), 1, 2, prefetch=0), RankBatches(_stream(reader), 1, 2, prefetch)
    for _ in range(5):
        a, b = plain.next_batch(4), ahead.next_batch(4)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert ahead.state == plain.state  # the consumed batch's state, not the producer's
    ahead.close()


def test_resume_from_a_prefetched_state_equals_the_uninterrupted_run(reader):
    uninterrupted = RankBatches(_stream(reader), prefetch=2)
    expected = [uninterrupted.next_batch(4)["input_ids"] for _ in range(6)]
    first = RankBatches(_stream(reader), prefetch=2)
    got = [first.next_batch(4)["input_ids"] for _ in range(3)]
    saved = first.state  # the producer is already batches ahead
    first.close()
    resumed = RankBatches(_stream(reader), prefetch=2)
    resumed.load_state(saved)
    got += [resumed.next_batch(4)["input_ids"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # load_state on a running prefetcher rewinds it too
    uninterrupted.load_state(saved)
    assert torch.equal(uninterrupted.next_batch(4)["input_ids"], expected[3])
    for source in (uninterrupted, resumed):
        source.close()


def test_errors_reach_the_consumer_in_order(reader):
    ahead = RankBatches(_stream(reader, seq_len=64), prefetch=2)
    n = 0
    with pytest.raises(StopIteration):
        while True:
            ahead.next_batch(4)
            n += 1
    assert n > 0
    ahead.close()


@pytest.mark.parametrize("world", [2, 4])
def test_sft_rows_per_rank_equal_the_global_batch_sliced(world):
    from lfm2_train.data.chat import EncodedChat
    from lfm2_train.data.sft_stream import SFTStream

    rng = np.random.default_rng(3)
    examples = [EncodedChat(list(range(n)), list(range(n))) for n in rng.integers(2, 20, size=60)]
    sequence = rng.permutation(len(examples))
    whole = SFTStream(examples, sequence, 24)
    ranks = [SFTStream(examples, sequence, 24) for _ in range(world)]
    for _ in range(3):
        batch = whole.next_batch(8)
        parts = [s.next_local_batch(8, r, world) for r, s in enumerate(ranks)]
        assert all(torch.equal(torch.cat([p[k] for p in parts]), batch[k]) for k in batch)
        assert all(s.state == whole.state for s in ranks)


def test_preference_pairs_per_rank_are_the_global_pairs_each_padded_alone():
    from lfm2_train.data.preference import EncodedPair, PairStream

    rng = np.random.default_rng(4)
    pairs = [EncodedPair(tuple(range(3)), tuple(range(int(a))), tuple(range(int(b))), i)
             for i, (a, b) in enumerate(rng.integers(1, 12, size=(10, 2)))]
    whole, ranks = PairStream(pairs, 0, None, seed=1), [PairStream(pairs, 0, None, seed=1) for _ in range(2)]
    for _ in range(4):  # crosses an epoch boundary (10 pairs, 4 per step)
        batch = whole.next_batch(4)
        parts = [s.next_local_batch(4, r, 2) for r, s in enumerate(ranks)]
        assert torch.equal(torch.cat([p["pair_index"] for p in parts]), batch["pair_index"])
        for r, part in enumerate(parts):
            T = part["input_ids"].shape[-1]
            assert torch.equal(part["input_ids"], batch["input_ids"][2 * r:2 * r + 2, :, :T])
            assert (batch["doc_ids"][2 * r:2 * r + 2, :, T:] == -1).all()  # only padding was left out
        assert all(s.state == whole.state for s in ranks)
