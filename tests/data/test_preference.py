"""Preference pairs: accepted row forms, masks of the collated batch, skips with counts, the batch stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lfm2_train.data.chat import encode_prompt_completion
from lfm2_train.data.chat_dataset import ChatRows
from lfm2_train.data.preference import (
    PairStream,
    collate_pairs,
    encode_pair,
    encode_pairs,
    load_preference_pairs,
    pairs_hash,
)
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
GOOD = "2 + 3 = 5. Answer: 5"
BAD = "2 + 3 = 6. Answer: 6"


@pytest.fixture(scope="module")
def tok() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def _conv(prompt=PROMPT, chosen=GOOD, rejected=BAD):
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def test_conversational_pair_tokens_and_masks(tok):
    pair = encode_pair(tok, _conv(), max_length=256)
    p, c = encode_prompt_completion(tok, PROMPT, GOOD)
    _, r = encode_prompt_completion(tok, PROMPT, BAD)
    assert (list(pair.prompt), list(pair.chosen), list(pair.rejected)) == (p, c, r)
    assert pair.chosen[-1] == tok.eos_token_id and pair.prompt[0] == tok.bos_token_id
    assert tok.decode(pair.prompt + pair.chosen) == tok.apply_chat_template(
        [*PROMPT, {"role": "assistant", "content": GOOD}], tokenize=False).rstrip("\n")

    short = encode_pair(tok, _conv(chosen="5"), max_length=256)
    batch = collate_pairs([pair, short], tok.pad_token_id)
    ids, doc, tgt = batch["input_ids"], batch["doc_ids"], batch["targets"]
    assert ids.shape == doc.shape == tgt.shape == (2, 2, pair.max_length)
    assert "labels" not in batch and batch["pair_index"].tolist() == [0, 1]
    for b, pr in enumerate((pair, short)):
        for j, comp in enumerate((pr.chosen, pr.rejected)):
            n, P = len(pr.prompt) + len(comp), len(pr.prompt)
            # labelled positions are exactly those whose *next* token is a completion token
            labelled = (tgt[b, j] != -100).nonzero().squeeze(1).tolist()
            assert labelled == list(range(P - 1, n - 1))
            assert tgt[b, j, P - 1:n - 1].tolist() == list(comp)
            assert ids[b, j, :n].tolist() == list(pr.prompt + comp)
            assert (doc[b, j, :n] == 0).all() and (doc[b, j, n:] == -1).all()
            assert (ids[b, j, n:] == tok.pad_token_id).all()


def test_plain_string_implicit_and_raw_forms(tok):
    conv = encode_pair(tok, _conv(prompt=[{"role": "user", "content": "Hi"}]), max_length=256)
    plain = encode_pair(tok, {"prompt": "Hi", "chosen": GOOD, "rejected": BAD}, max_length=256)
    implicit = encode_pair(tok, {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": GOOD}],
                                 "rejected": [{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": BAD}]}, max_length=256)
    bare_dict = encode_pair(tok, {"prompt": "Hi", "chosen": {"role": "assistant", "content": GOOD},
                                  "rejected": BAD}, max_length=256)
    assert conv == plain == implicit == bare_dict
    raw = encode_pair(tok, {"prompt": "2 + 3 =", "chosen": " 5", "rejected": " 6"}, max_length=256, plain_text="raw")
    assert list(raw.prompt) == tok.encode("2 + 3 =", add_special_tokens=True)
    assert list(raw.chosen) == tok.encode(" 5") + [tok.eos_token_id]


def test_bad_rows_are_skipped_and_counted(tok):
    rows = [
        _conv(),
        _conv(chosen=GOOD, rejected=GOOD),  # identical
        _conv(chosen=GOOD * 40),  # too long
        {"prompt": "", "chosen": GOOD, "rejected": BAD},  # no prompt
        {"prompt": None, "chosen": GOOD, "rejected": BAD},  # no prompt
        _conv(prompt=[{"role": "wizard", "content": "hi"}]),  # unknown role in the prompt
        {"prompt": "Hi", "chosen": [{"role": "robot", "content": GOOD}], "rejected": BAD},  # unknown role
        {"prompt": "Hi", "chosen": [{"role": "user", "content": GOOD}], "rejected": BAD},  # not an assistant turn
        {"prompt": "Hi", "chosen": "   ", "rejected": BAD},  # empty response
        {"prompt": "Hi", "chosen": 3, "rejected": BAD},  # malformed
    ]
    out = encode_pairs(tok, ChatRows(rows, "fp", "mem"), max_length=64)
    assert len(out) == 1 and out.pairs[0].row == 0 and out.n_rows == 10
    assert dict(out.skipped) == {"identical": 1, "too_long": 1, "no_prompt": 2, "unknown_role": 2,
                                 "bad_completion": 1, "empty_content": 1, "bad_format": 1}
    assert "identical=1" in out.describe() and "1 usable" in out.describe()
    with pytest.raises(ValueError, match="no usable preference pair.*identical=1"):
        encode_pairs(tok, ChatRows(rows[1:2], "fp", "mem"), max_length=64)


def test_load_from_jsonl_and_hash_tracks_tokens(tmp_path, tok):
    path = tmp_path / "pairs.jsonl"
    rows = [_conv(), _conv(chosen="5"), _conv(rejected=GOOD)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_preference_pairs(path, tok, max_length=256, cache_dir=str(tmp_path / "hf"))
    assert len(pairs) == 2 and dict(pairs.skipped) == {"identical": 1}
    assert pairs.data_hash() == pairs_hash(pairs.pairs)
    changed = list(pairs.pairs)
    changed[1] = type(changed[1])(changed[1].prompt, changed[1].chosen[:-2] + changed[1].chosen[-1:],
                                  changed[1].rejected, 1)
    assert pairs_hash(changed) != pairs.data_hash()
    with pytest.raises(FileNotFoundError):
        load_preference_pairs(tmp_path / "missing.jsonl", tok, max_length=256)


def test_stream_shuffles_per_epoch_resumes_and_carries_reference(tok):
    pairs = [encode_pair(tok, _conv(chosen=f"Answer: {i}"), max_length=256, index=i) for i in range(5)]
    ref = np.arange(10, dtype=np.float32).reshape(5, 2) * -1
    a = PairStream(pairs, tok.pad_token_id, ref, seed=3)
    first = [a.next_batch(2)["pair_index"].tolist() for _ in range(5)]  # two epochs
    seen = sum(first, [])
    assert sorted(seen[:5]) == list(range(5)) and sorted(seen[5:10]) == list(range(5))
    b = PairStream(pairs, tok.pad_token_id, ref, seed=3)
    b.next_batch(2)
    b.next_batch(2)
    c = PairStream(pairs, tok.pad_token_id, ref, seed=3)
    c.load_state(b.state)
    batch = c.next_batch(2)
    assert batch["pair_index"].tolist() == first[2]
    assert batch["ref_logps"].tolist() == [ref[i].tolist() for i in first[2]]
