"""Reference log-prob cache: computed once, reused without building pi_ref, invalidated by data or weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm2_train.data.format import DataFormatError
from lfm2_train.data.preference import encode_pair, pairs_hash
from lfm2_train.data.ref_logps import REF_ARRAY, StaleCacheError, compute_reference_logps, reference_logps
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


@pytest.fixture(scope="module")
def tok() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def _pairs(tok, n=5, offset=0):
    return [encode_pair(tok, {"prompt": f"What is {i} + 1?", "chosen": f"Answer: {i + 1}",
                              "rejected": f"I think {i} + 1 is {i * 7 + 3}"}, max_length=256, index=i)
            for i in range(offset, offset + n)]


def _save_model(path, seed):
    torch.manual_seed(seed)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(path)
    return path




def _get(tok, pairs, ref, directory=None, **kw):
    return reference_logps(pairs, data_hash=pairs_hash(pairs), tokenizer_fingerprint=tok.fingerprint(),
                           reference=ref, pad_id=tok.pad_token_id, directory=directory, batch_pairs=2, **kw)


def test_second_run_reads_the_cache_without_building_the_reference(tmp_path, tok, reference_loads):
    ref = _save_model(tmp_path / "ref", 0)
    pairs = _pairs(tok)
    first, info = _get(tok, pairs, ref, tmp_path / "cache")
    assert info["status"] == "computed" and reference_loads["n"] == 1
    again, info2 = _get(tok, pairs, ref, tmp_path / "cache")
    assert info2["status"] == "hit" and reference_loads["n"] == 1
    assert np.array_equal(first, again) and first.shape == (5, 2) and (first < 0).all()
    # batched, length-sorted and padded == one pair at a time
    model = LFM2ForCausalLM.from_pretrained(ref)
    single = np.concatenate([compute_reference_logps(model, [p], tok.pad_token_id) for p in pairs])
    assert np.allclose(first, single, atol=1e-5)


def test_changed_data_or_weights_invalidate(tmp_path, tok, reference_loads, monkeypatch):
    monkeypatch.setenv("LFM2_TRAIN_CACHE", str(tmp_path / "root"))
    ref = _save_model(tmp_path / "ref", 0)
    pairs = _pairs(tok)
    base, info = _get(tok, pairs, ref)  # content-addressed default directory
    assert info["directory"].startswith(str(tmp_path / "root" / "ref_logps"))
    other, info_other = _get(tok, _pairs(tok, offset=1), ref)  # other data: another key, another directory
    assert info_other["status"] == "computed" and info_other["directory"] != info["directory"]
    assert np.array_equal(other[:4], base[1:]) and reference_loads["n"] == 2

    explicit = tmp_path / "cache"
    _get(tok, pairs, ref, explicit)
    _save_model(ref, 1)  # same path, new weights
    with pytest.raises(StaleCacheError, match=r"\(reference_weights_sha256: cached [0-9a-f]{12}…, now [0-9a-f]{12}…\)"
                       r".*ref_cache_overwrite"):
        _get(tok, pairs, ref, explicit)
    with pytest.raises(StaleCacheError, match="data_hash"):
        _get(tok, _pairs(tok, offset=1), ref, explicit)
    new, info_new = _get(tok, pairs, ref, explicit, overwrite=True)
    assert info_new["status"] == "recomputed" and not np.allclose(new, base)
    moved, info_default = _get(tok, pairs, ref)  # the default directory follows the weights
    assert info_default["status"] == "computed" and np.array_equal(moved, new)


def test_damaged_cache_is_refused(tmp_path, tok):
    ref = _save_model(tmp_path / "ref", 0)
    pairs = _pairs(tok, n=2)
    _get(tok, pairs, ref, tmp_path / "cache")
    (tmp_path / "cache" / REF_ARRAY).write_bytes(np.zeros((2, 2), np.float32).tobytes())
    with pytest.raises(DataFormatError, match="sha256"):
        _get(tok, pairs, ref, tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        _get(tok, pairs, tmp_path, tmp_path / "other")
