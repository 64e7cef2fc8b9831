"""SFT difficulty job: success rate over n samples with a verifier, the classifier, and the file contract."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest
import torch

from data_pipelines.sft_difficulty import hashed_features, prompt_messages, resolve_verifier, run, spearman
from lfm2_train.data.chat_dataset import bundled_rows, load_difficulty
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

_Q = re.compile(r"(\d+) ([-+*]) (\d+)")
N_ROWS = 150


def fake_sampler(prompts, tools, n):
    """Always right on one-digit operands with '+', right on 1 of 3 samples for other one-digit problems,
    never right on anything larger: success = 1, 1/3, 0."""
    out = []
    for p in prompts:
        a, op, b = _Q.search(p[-1]["content"]).groups()
        value = int(a) + int(b) if op == "+" else int(a) - int(b) if op == "-" else int(a) * int(b)
        small = len(a) == 1 and len(b) == 1
        right = [small and (op == "+" or j == 0) for j in range(n)]
        out.append([f"Answer: {value if ok else value + 1}" for ok in right])
    return out


def _expected(rows) -> np.ndarray:
    exp = []
    for r in rows:
        a, op, b = _Q.search(r["messages"][0]["content"]).groups()
        small = len(a) == 1 and len(b) == 1
        exp.append(0.0 if small and op == "+" else 1 - 1 / 3 if small else 1.0)
    return np.array(exp)


def _cfg(tmp_path, **kw):
    return {"output": str(tmp_path / kw.pop("name", "d.json")), "bundled_rows": N_ROWS, "seed": 0,
            "success_rate": {"n_samples": 3, "batch_size": 16}, **kw}


def test_success_rate_difficulty_is_one_minus_success(tmp_path):
    summary = run(_cfg(tmp_path), sample=fake_sampler)
    data = bundled_rows(N_ROWS, 0)
    values, header = load_difficulty(summary["output"], dataset_fingerprint=data.fingerprint, n_rows=N_ROWS)
    np.testing.assert_allclose(values, _expected(data.rows))
    assert header["method"] == "success_rate" and header["meta"]["n_samples"] == 3
    assert summary["scored"] == N_ROWS and 0 < summary["mean_success"] < 1


def test_subset_then_classifier_predicts_the_rest(tmp_path):
    measured = run(_cfg(tmp_path, name="m.json", success_rate={"n_samples": 3, "max_items": 100}),
                   sample=fake_sampler)
    assert measured["scored"] == 100
    summary = run(_cfg(tmp_path, name="c.json", method="classifier",
                       classifier={"scores": measured["output"], "steps": 150, "n_features": 4096}))
    data = bundled_rows(N_ROWS, 0)
    values, _ = load_difficulty(summary["output"], dataset_fingerprint=data.fingerprint, n_rows=N_ROWS)
    part, _ = load_difficulty(measured["output"], require_complete=False)
    known = ~np.isnan(part)
    np.testing.assert_array_equal(values[known], part[known])  # measured values are kept
    assert np.all((values >= 0) & (values <= 1))
    expected = _expected(data.rows)
    assert spearman(values[~known], expected[~known]) > 0.7  # predictions on the unmeasured rows
    assert summary["val_spearman"] > 0.7


def test_checkpoint_sampler_end_to_end(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(ckpt)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(ckpt)
    summary = run(_cfg(tmp_path, success_rate={"checkpoint": str(ckpt), "n_samples": 2, "max_items": 4,
                                               "max_new_tokens": 4, "device": "cpu"}))
    values, header = load_difficulty(summary["output"], require_complete=False)
    scored = values[~np.isnan(values)]
    assert len(scored) == 4 and set(scored.tolist()) <= {0.0, 0.5, 1.0}
    assert header["meta"]["checkpoint"] == str(ckpt)


def test_features_are_stable_normalised_and_digit_shaped():
    a_ids, a_w = hashed_features("What is 47 + 27?", 1 << 12)
    b_ids, b_w = hashed_features("What is 93 + 11?", 1 << 12)
    assert a_ids.tolist() == b_ids.tolist() and np.allclose(a_w, b_w)  # same shape of problem
    assert np.isclose(np.linalg.norm(a_w), 1.0)
    c_ids, _ = hashed_features("What is 4 + 27?", 1 << 12)
    assert set(c_ids.tolist()) != set(a_ids.tolist())


def test_bad_input_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="method="):
        run(_cfg(tmp_path, method="vibes"))
    with pytest.raises(ValueError, match="success_rate.checkpoint"):
        run(_cfg(tmp_path))
    with pytest.raises(ValueError, match="classifier.scores"):
        run(_cfg(tmp_path, method="classifier"))
    with pytest.raises(KeyError, match="no column 'gold'"):
        run(_cfg(tmp_path, success_rate={"answer_field": "gold"}), sample=fake_sampler)
    with pytest.raises(ValueError, match="must be 'module:function'"):
        resolve_verifier("verify")
    generous = types.ModuleType("generous_judge")
    generous.verify = lambda response, answer: 2.0
    monkeypatch.setitem(sys.modules, "generous_judge", generous)
    with pytest.raises(ValueError, match=r"scores must be in \[0, 1\]"):
        run(_cfg(tmp_path, success_rate={"verifier": "generous_judge:verify"}), sample=fake_sampler)
    run(_cfg(tmp_path), sample=fake_sampler)
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run(_cfg(tmp_path), sample=fake_sampler)
    no_output = {k: v for k, v in _cfg(tmp_path).items() if k != "output"}
    with pytest.raises(ValueError, match="output="):
        run(no_output, sample=fake_sampler)
    assert run({**no_output, "output_dir": str(tmp_path / "job")}, sample=fake_sampler)["output"] == \
        str(tmp_path / "job" / "difficulty.json")


def test_prompt_is_everything_before_the_last_reply():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "a2"}]
    assert prompt_messages(msgs) == msgs[:4]
