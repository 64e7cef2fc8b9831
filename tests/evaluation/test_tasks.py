"""Generation and multiple-choice tasks on a bigram model whose preferences are set by hand, so every
expected score below is worked out on paper (see each test's comment)."""

from __future__ import annotations

import json
import math

import pytest

from lfm2_train.evaluation import make_runner
from lfm2_train.evaluation.scoring import exact_match, numeric_match, parse_number, pick_choice
from lfm2_train.evaluation.tasks import parse_task, run_generation, run_multiple_choice


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_answer_matching_rules():
    assert exact_match("  The Cat. ", "the cat") == 1.0
    assert exact_match("Let me think.\nAnswer: Paris", "paris") == 1.0
    assert exact_match("Paris is big", "Paris") == 0.0
    assert parse_number("3 apples and 1,250 pears") == 1250.0
    assert parse_number("12 + 30 = 42. Answer: 42") == 42.0
    assert numeric_match("Answer: 42.0", 42) == 1.0 and numeric_match("41", "42") == 0.0
    assert numeric_match("no number", 3) == 0.0
    assert pick_choice([-1.0, -3.0, -1.0], [1, 10, 1]) == (0, 1)  # ties go to the first choice


def test_generation_exact_and_numeric(tmp_path, tokenizer, bigram):
    # The model always answers "4" and ends the turn.
    four = tokenizer.token_to_id("4")
    runner = make_runner(bigram({four: tokenizer.eos_token_id}, default=four), batch_size=3)
    rows = [{"q": "2 + 2?", "a": "4"},  # exact and numeric
            {"q": "Two plus two, as a float?", "a": "4.0"},  # numeric only
            {"q": "Spell 4.", "a": "four"},  # neither
            {"q": "3 + 4?", "a": 7}]  # neither
    spec = parse_task({"kind": "generation", "path": _jsonl(tmp_path / "gen.jsonl", rows), "prompt_field": "q",
                       "answer_field": "a", "metric": "numeric"}, 0)
    res = run_generation(spec, runner, tokenizer)
    assert res.name == "gen" and res.n == 4
    assert res.metrics == {"numeric_match": 0.5, "exact_match": 0.25}
    assert list(res.metrics)[0] == "numeric_match"  # the headline metric leads
    assert [s["response"] for s in res.samples] == ["4"] * 4


def test_generation_plain_prompt_and_stop_strings(tmp_path, tokenizer, bigram):
    # "4" -> "7" -> end of turn: the raw response is "47"; the stop string "7" cuts it to "4".
    four, seven = tokenizer.token_to_id("4"), tokenizer.token_to_id("7")
    runner = make_runner(bigram({four: seven, seven: tokenizer.eos_token_id}, default=four))
    path = _jsonl(tmp_path / "g.jsonl", [{"prompt": "x", "answer": "4"}, {"prompt": "y", "answer": "47"}])
    plain = run_generation(parse_task({"kind": "generation", "path": path, "chat": False}, 0), runner, tokenizer)
    assert plain.metrics["exact_match"] == 0.5 and plain.samples[1]["response"] == "47"
    cut = run_generation(parse_task({"kind": "generation", "path": path, "stop": ["7"]}, 0), runner, tokenizer)
    assert cut.metrics["exact_match"] == 0.5 and cut.samples[1]["response"] == "4"


def test_multiple_choice_acc_and_acc_norm(tmp_path, tokenizer, bigram):
    # After any token the model puts logit 10 on "4" and 0 on the other 511 tokens, so
    #   log p("4") = a = 10 - log(e^10 + 511),  log p(anything else) = b = -log(e^10 + 511).
    # Digits are single tokens; with choice_prefix "" a choice's log-likelihood is (#4s) a + (#others) b.
    four = tokenizer.token_to_id("4")
    model = bigram({}, default=four)
    a, b = 10 - math.log(math.exp(10) + 511), -math.log(math.exp(10) + 511)
    long = "7" + "4" * 20  # b + 20a = -11.04 total, but -0.53 per character
    rows = [
        {"prompt": "Q1", "choices": ["4", "7"], "label": 0},  # acc ok (a > b), acc_norm ok
        {"prompt": "Q2", "choices": ["7", "4"], "label": 0},  # both wrong
        {"prompt": "Q3", "choices": ["7", "4"], "label": "4"},  # label given as text: both ok
        {"prompt": "Q4", "choices": ["7", long], "label": 1},  # sum picks "7" (b > b + 20a): acc wrong;
    ]  #                                                          per char picks `long`: acc_norm ok
    path = _jsonl(tmp_path / "mc.jsonl", rows)
    res = run_multiple_choice(parse_task({"kind": "multiple_choice", "path": path, "choice_prefix": ""}, 0),
                              make_runner(model, batch_size=3), tokenizer)
    assert res.metrics == {"acc": 2 / 4, "acc_norm": 3 / 4}
    assert res.samples[3]["logliks"] == pytest.approx([b, b + 20 * a], abs=1e-4)
    assert res.samples[0]["logliks"] == pytest.approx([a, b], abs=1e-4)
    # Normalising by tokens instead of characters: the same here (digits are one token each).
    tok = run_multiple_choice(parse_task({"kind": "multiple_choice", "path": path, "choice_prefix": "",
                                          "length_norm": "tokens"}, 0), make_runner(model), tokenizer)
    assert tok.metrics == res.metrics


def test_bad_task_specs_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"stage.tasks\[2\].kind='bleu'"):
        parse_task({"kind": "bleu"}, 2)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_shots'\]"):
        parse_task({"kind": "arithmetic", "n_shots": 3}, 0)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        parse_task({"kind": "generation", "path": str(tmp_path / "nope.jsonl")}, 0)
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "choices": ["a", "b"], "label": 5}])
    with pytest.raises(ValueError, match="out of range"):
        run_multiple_choice(parse_task({"kind": "multiple_choice", "path": bad}, 0), None, None)
    missing = _jsonl(tmp_path / "missing.jsonl", [{"question": "x", "answer": "1"}])
    with pytest.raises(KeyError, match="no field 'prompt'"):
        run_generation(parse_task({"kind": "generation", "path": missing}, 0), None, None)
