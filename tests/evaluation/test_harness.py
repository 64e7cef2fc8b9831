"""The lm-evaluation-harness adapter on tiny local YAML tasks (no hub), checked against hand-worked
scores from the bigram model and against our own multiple-choice code."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("lm_eval")

from lfm2_train.evaluation.harness import LFM2LM, evaluate_tasks  # noqa: E402

MC_ROWS = [
    {"prompt": "Q1", "choices": ["4", "7"], "label": 0},
    {"prompt": "Q2", "choices": ["7", "4"], "label": 0},
    {"prompt": "Q3", "choices": ["7", "4"], "label": 1},
    {"prompt": "Q4", "choices": ["7", "7" + "4" * 20], "label": 1},
]
GEN_ROWS = [{"prompt": "2 + 2 =", "answer": "4"}, {"prompt": "1 + 3 =", "answer": "4"},
            {"prompt": "3 + 4 =", "answer": "7"}]


def _task_dir(tmp_path):
    for name, rows in (("mc", MC_ROWS), ("gen", GEN_ROWS)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{prompt}}\"\n"
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: label\ntarget_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (tmp_path / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\ntarget_delimiter: \"\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return tmp_path


def test_registered_under_lfm2_train():
    from lm_eval.api.registry import get_model

    assert get_model("lfm2_train") is LFM2LM


@pytest.mark.slow
def test_local_yaml_tasks_score_as_worked_out_by_hand(tmp_path, tokenizer, bigram):
    # The model puts logit 10 on "4" after every token except "4", after which it ends the turn.
    # Multiple choice (see test_tasks.py for the arithmetic): acc 2/4, acc_norm 3/4.
    # Generation: every answer is "4": 2 of 3 targets match.
    four = tokenizer.token_to_id("4")
    lm = LFM2LM(model=bigram({}, default=four), tokenizer=tokenizer, batch_size=4)
    results = evaluate_tasks(lm, ["tiny_mc"], include_path=str(_task_dir(tmp_path)))
    assert results["tiny_mc"] == ({"acc": 0.5, "acc_norm": 0.75}, 4)
    lm_gen = LFM2LM(model=bigram({four: tokenizer.eos_token_id}, default=four), tokenizer=tokenizer)
    gen = evaluate_tasks(lm_gen, ["tiny_gen"], include_path=str(tmp_path))
    assert gen["tiny_gen"][0]["exact_match"] == pytest.approx(2 / 3) and gen["tiny_gen"][1] == 3


class _Req:
    def __init__(self, *args):
        self.args = args


def test_rolling_loglikelihood_is_window_independent(tokenizer, bigram):
    # "4747": from bos, p(4) = a, then p(7|4) = b, p(4|7) = a, p(7|4) = b  ->  2a + 2b, however windowed.
    four = tokenizer.token_to_id("4")
    a, b = 10 - math.log(math.exp(10) + 511), -math.log(math.exp(10) + 511)
    for max_length in (2, 3, 100):
        lm = LFM2LM(model=bigram({}, default=four), tokenizer=tokenizer, max_length=max_length)
        assert lm.loglikelihood_rolling([_Req("4747")]) == [pytest.approx(2 * a + 2 * b, abs=1e-4)]


def test_context_continuation_split_and_chat(tokenizer, bigram):
    lm = LFM2LM(model=bigram({}, default=4), tokenizer=tokenizer)
    ctx, cont = lm._split("Answer: ", "4")  # the trailing space moves to the continuation
    assert ctx == [tokenizer.bos_token_id, *tokenizer.encode("Answer:")]
    assert cont == tokenizer.encode(" 4")
    chat = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.startswith("<|startoftext|>") and chat.endswith("<|im_start|>assistant\n")
    assert lm._context_ids(chat)[:2] == [tokenizer.bos_token_id, tokenizer.token_to_id("<|im_start|>")]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([_Req("x", {"do_sample": True, "temperature": 0.7})])
