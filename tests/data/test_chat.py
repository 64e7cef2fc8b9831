"""Chat encoding: exact ids and masks over multi-turn, system and tool conversations; bad rows classified."""

from __future__ import annotations

import json

import pytest

from lfm2_train.data.chat import (
    ChatFormatError,
    classify_row,
    encode_conversation,
    encode_prompt_completion,
)
from lfm2_train.data.packed import IGNORE_INDEX
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                           "parameters": {"type": "object",
                                                          "properties": {"a": {"type": "integer"},
                                                                         "b": {"type": "integer"}}}}}]

MULTI_TURN = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5. Answer: 5"},
    {"role": "user", "content": "And 4 * 4?"},
    {"role": "assistant", "content": "4 * 4 = 16.\nAnswer: 16"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse."}] + MULTI_TURN
WITH_TOOLS = [
    {"role": "system", "content": "Use tools when useful."},
    {"role": "user", "content": "add 12 and 30"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}]},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "The sum is 42."},
]
# What each conversation's labelled tokens must decode to: every assistant turn's content + <|im_end|>.
EXPECTED_LABELLED = {
    "multi_turn": "2 + 3 = 5. Answer: 5<|im_end|>4 * 4 = 16.\nAnswer: 16<|im_end|>",
    "system": "2 + 3 = 5. Answer: 5<|im_end|>4 * 4 = 16.\nAnswer: 16<|im_end|>",
    "tools": '<|tool_call_start|>[{"name": "add", "arguments": {"a": 12, "b": 30}}]<|tool_call_end|><|im_end|>'
             "The sum is 42.<|im_end|>",
}
CASES = {"multi_turn": (MULTI_TURN, None), "system": (WITH_SYSTEM, None), "tools": (WITH_TOOLS, TOOLS)}


@pytest.fixture(scope="module")
def tok() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def _labelled_runs(enc) -> list[list[int]]:
    runs, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_whole_string_tokenisation(tok, case):
    msgs, tools = CASES[case]
    enc = encode_conversation(tok, msgs, tools)
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert enc.input_ids == tok.encode(text)
    assert len(enc.labels) == len(enc.input_ids)


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_assistant_content_and_im_end_carry_labels(tok, case):
    msgs, tools = CASES[case]
    enc = encode_conversation(tok, msgs, tools)
    assert tok.decode([lab for lab in enc.labels if lab != IGNORE_INDEX]) == EXPECTED_LABELLED[case]
    n_assistant = sum(m["role"] == "assistant" for m in msgs)
    runs = _labelled_runs(enc)
    assert len(runs) == n_assistant  # one contiguous run per assistant turn
    im_end, im_start = tok.eos_token_id, tok.token_to_id("<|im_start|>")
    for run in runs:
        assert run[-1] == im_end and im_end not in run[:-1]
    for i, (tid, lab) in enumerate(zip(enc.input_ids, enc.labels)):
        if lab != IGNORE_INDEX:
            continue
        # unlabelled: everything outside assistant turns, incl. the header and the "\n" after <|im_end|>
        if tid == im_end:
            # an <|im_end|> without a label closes a non-assistant turn
            header = enc.input_ids[max(j for j in range(i) if enc.input_ids[j] == im_start) + 1]
            assert tok.decode([header]) != "assistant"


def test_header_and_newline_after_turn_unlabelled(tok):
    enc = encode_conversation(tok, MULTI_TURN)
    text_of = [tok.decode([t]) for t in enc.input_ids]
    for k, (piece, lab) in enumerate(zip(text_of, enc.labels)):
        if piece == "<|im_end|>" and lab != IGNORE_INDEX:
            assert enc.labels[k + 1] == IGNORE_INDEX and text_of[k + 1].startswith("\n")
    first = next(k for k, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert "".join(text_of[:first]).endswith("<|im_start|>assistant\n")


def test_prompt_completion_consistent_with_conversation(tok):
    prompt = WITH_SYSTEM[:4]  # system, user, assistant, user
    completion = WITH_SYSTEM[4]["content"]
    p, c = encode_prompt_completion(tok, prompt, completion)
    assert p == tok.apply_chat_template(prompt, add_generation_prompt=True)
    enc = encode_conversation(tok, WITH_SYSTEM)
    assert enc.input_ids[:len(p) + len(c)] == p + c
    assert enc.labels[len(p):len(p) + len(c)] == c
    assert c[-1] == tok.eos_token_id


def test_prompt_completion_with_tools(tok):
    p, c = encode_prompt_completion(tok, WITH_TOOLS[:4], "The sum is 42.", tools=TOOLS)
    assert p + c == encode_conversation(tok, WITH_TOOLS, TOOLS).input_ids[:len(p) + len(c)]
    assert tok.decode(c) == "The sum is 42.<|im_end|>"


def test_datasets_round_trip_renders_like_the_original(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    # Arrow fills missing keys with None (user turns get tool_calls: None); encoding must not change.
    rows = [{"messages": WITH_SYSTEM, "tools": None},
            {"messages": [dict(m, **({"tool_calls": [{"type": "function", "function": {
                "name": "add", "arguments": json.dumps({"a": 12, "b": 30})}}]} if m.get("tool_calls") else {}))
                for m in WITH_TOOLS], "tools": TOOLS}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    for row, loaded in zip(rows, ds):
        assert encode_conversation(tok, loaded["messages"], loaded["tools"]).input_ids == \
            encode_conversation(tok, row["messages"], row["tools"]).input_ids


@pytest.mark.parametrize("messages,reason", [
    ([{"role": "user", "content": "hi"}], "no_assistant_turn"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}], "no_assistant_turn"),
    ([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown_role"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "y"}], "empty_content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "empty_content"),
    ([{"role": "user", "content": "q"}, {"role": "assistant"}], "empty_content"),
    ("not a list", "bad_format"),
    ([["user", "hi"]], "bad_format"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "bad_format"),
])
def test_bad_rows_classified(tok, messages, reason):
    assert classify_row(tok, messages) == reason
    with pytest.raises(ChatFormatError) as info:
        encode_conversation(tok, messages)
    assert info.value.reason == reason


def test_too_long(tok):
    n = len(encode_conversation(tok, MULTI_TURN))
    assert classify_row(tok, MULTI_TURN, max_length=n) is None
    assert classify_row(tok, MULTI_TURN, max_length=n - 1) == "too_long"


def test_tool_call_only_assistant_turn_is_usable(tok):
    assert classify_row(tok, WITH_TOOLS[:3], TOOLS) is None
