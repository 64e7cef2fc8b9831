from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm2_train.data.format import Manifest, ShardReader, write_shard
from lfm2_train.data.packed import IGNORE_INDEX, DocumentStream, split_documents


@pytest.fixture
def reader(tmp_path):
    docs = [list(range(10 * i + 10, 10 * i + 10 + n)) + [2] for i, n in enumerate([5, 1, 12, 3, 7, 0, 9])]
    flat = np.array([t for d in docs for t in d], dtype=np.uint16)
    offsets = np.cumsum([0] + [len(d) for d in docs])
    shard = write_shard(tmp_path, "shard-00000", flat, offsets)
    Manifest("fp", 512, "uint16", 2, [shard]).save(tmp_path)
    return ShardReader(tmp_path), docs


def test_rows_concatenate_documents_and_mask_boundaries(reader):
    r, docs = reader
    order = np.arange(len(docs))
    stream = DocumentStream(r, order, seq_len=8)
    batch = stream.next_batch(3)
    ids, labels, doc_ids = batch["input_ids"], batch["labels"], batch["doc_ids"]
    assert ids.shape == labels.shape == doc_ids.shape == (3, 8)
    flat = [t for d in docs for t in d]
    # Row 0 holds the first 9 tokens (8 inputs + 1 label); the cut document resumes at the row's last token.
    assert ids[0].tolist() == flat[:8]
    assert ids[1, 0].item() == flat[8]
    for row in range(3):
        for t in range(8):
            if t + 1 < 8 and doc_ids[row, t + 1] != doc_ids[row, t]:
                assert labels[row, t] == IGNORE_INDEX
    # Every non-masked label is the next token of the same document.
    assert (labels[0, :5] == ids[0, 1:6]).all()


def test_every_token_is_a_label_once_in_order(reader):
    r, docs = reader
    stream = DocumentStream(r, np.arange(len(docs)), seq_len=4)
    seen = []
    for batch in stream.drain(2):
        for row_labels in batch["labels"]:
            seen += [int(y) for y in row_labels if y != IGNORE_INDEX]
    expected = [t for d in docs for t in d[1:]]  # each document's tokens after its first
    assert seen == expected


def test_resume_state_reproduces_the_stream(reader):
    r, docs = reader
    order = np.array([3, 1, 4, 0, 6, 2, 5, 3, 1, 4])
    full = DocumentStream(r, order, seq_len=5)
    first = [full.next_batch(2) for _ in range(2)]
    state = dict(full.state.to_dict())
    rest = [full.next_batch(2) for _ in range(2)]
    resumed = DocumentStream(r, order, seq_len=5)
    resumed.load_state(state)
    again = [resumed.next_batch(2) for _ in range(2)]
    for a, b in zip(rest, again):
        for k in a:
            assert (a[k] == b[k]).all()
    assert not all((first[0][k] == rest[0][k]).all() for k in first[0])


def test_exhaustion_consumes_nothing_and_drain_pads(reader):
    r, docs = reader
    stream = DocumentStream(r, np.array([0, 1]), seq_len=20)
    with pytest.raises(StopIteration):
        stream.next_batch(1)
    assert stream.state.cursor == 0 and stream.state.offset == 0
    batches = stream.drain(4)
    assert len(batches) == 1 and batches[0]["input_ids"].shape == (1, 20)
    assert (batches[0]["doc_ids"][0, -1] == -1) and (batches[0]["labels"][0, -1] == IGNORE_INDEX)


def test_split_is_seeded_and_disjoint():
    train, val = split_documents(100, 0.1, 5, seed=1)
    assert len(val) == 5 and len(train) == 95 and not set(train) & set(val)
    assert np.array_equal(split_documents(100, 0.1, 5, seed=1)[1], val)
    assert not np.array_equal(split_documents(100, 0.1, 5, seed=2)[1], val)
    with pytest.raises(ValueError, match="empty"):
        DocumentStream(None, np.array([], dtype=np.int64), 4)


def test_token_index_points_at_each_input_token(reader):
    r, docs = reader
    flat = np.concatenate([r.document(i) for i in range(len(docs))])
    stream = DocumentStream(r, np.array([4, 2, 0, 6]), seq_len=6)
    for batch in [stream.next_batch(2), *stream.drain(3)]:
        idx, ids = batch["token_index"], batch["input_ids"]
        valid = idx >= 0
        assert (torch.from_numpy(flat.astype(np.int64))[idx[valid]] == ids[valid]).all()
