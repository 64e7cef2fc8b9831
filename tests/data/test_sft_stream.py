"""SFT packing: whole conversations per document, never mixed, exact resume, isolation inside the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm2_train.data.chat import EncodedChat, encode_conversation
from lfm2_train.data.packed import IGNORE_INDEX
from lfm2_train.data.sft_stream import SFTStream, count_rows, positions_needed
from lfm2_train.losses import lm_loss
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tasks import sft_conversations
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


@pytest.fixture(scope="module")
def examples() -> list[EncodedChat]:
    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    rows = sft_conversations(40, seed=3)
    rows[5]["messages"] = [{"role": "system", "content": "Show your work."}] + rows[5]["messages"]
    return [encode_conversation(tok, r["messages"]) for r in rows]


def _segments(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) of every document of every row, in reading order."""
    out = []
    for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["doc_ids"]):
        for d in torch.unique(docs[docs >= 0]).tolist():
            where = docs == d
            idx = torch.nonzero(where).flatten()
            assert bool((idx[1:] - idx[:-1] == 1).all())  # a document is contiguous
            out.append((ids[where].tolist(), labels[where].tolist()))
    return out


def test_packing_never_mixes_examples_and_keeps_order(examples):
    seq = np.random.default_rng(0).permutation(len(examples))
    stream = SFTStream(examples, seq, seq_len=64)
    batches = [stream.next_batch(2) for _ in range(3)] + stream.drain(2)
    segs = [s for b in batches for s in _segments(b)]
    assert len(segs) == len(seq)
    for (inputs, targets), i in zip(segs, seq):
        ex = examples[int(i)]
        assert inputs == ex.input_ids[:-1] and targets == ex.labels[1:]
    for b in batches:  # padding: doc -1, no labels; labelled positions predict the next token of their doc
        pad = b["doc_ids"] < 0
        assert bool((b["labels"][pad] == IGNORE_INDEX).all())


def test_row_count_matches_the_planner(examples):
    seq = np.concatenate([np.arange(len(examples))] * 2)
    rows = sum(b["input_ids"].shape[0] for b in SFTStream(examples, seq, 80).drain(3))
    assert rows == count_rows([positions_needed(examples[i]) for i in seq], 80)


def test_resume_from_state_equals_uninterrupted(examples):
    seq = np.arange(len(examples))
    full = SFTStream(examples, seq, 64)
    expected = [full.next_batch(2) for _ in range(4)]
    part = SFTStream(examples, seq, 64)
    part.next_batch(2)
    state = dict(part.state.to_dict())
    resumed = SFTStream(examples, seq, 64)
    resumed.load_state(state)
    for want in expected[1:]:
        got = resumed.next_batch(2)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_exhausted_stream_consumes_nothing(examples):
    stream = SFTStream(examples, np.arange(3), 64)
    before = stream.state.to_dict()
    with pytest.raises(StopIteration):
        stream.next_batch(8)
    assert stream.state.to_dict() == before


def test_bad_sequences_rejected(examples):
    with pytest.raises(ValueError, match="empty"):
        SFTStream(examples, np.array([], dtype=np.int64), 64)
    with pytest.raises(ValueError, match="positions"):
        SFTStream(examples, np.arange(3), seq_len=4)


def test_packed_loss_equals_each_conversation_alone(examples):
    """Attention and the conv never cross conversations: packed loss == sum of per-conversation losses."""
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny")).eval()
    seq = np.arange(6)
    batches = SFTStream(examples, seq, 112).drain(8)
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] < len(seq)  # several per row
    with torch.no_grad():
        packed, n_packed = lm_loss(model, batches[0])
        alone, n_alone = 0.0, 0
        for i in seq:
            ex = examples[int(i)]
            one = {"input_ids": torch.tensor([ex.input_ids[:-1]]), "labels": torch.tensor([ex.labels[1:]])}
            loss, n = lm_loss(model, one)
            alone, n_alone = alone + float(loss), n_alone + int(n)
    assert int(n_packed) == n_alone
    assert float(packed) == pytest.approx(alone, rel=1e-5)
