"""Chat conversations -> token ids with labels only on what the assistant says.

The text is always the tokenizer's own chat template (`apply_chat_template`), so training sees exactly
what generation will see. Label boundaries come from rendering prefixes of the conversation: the text
of `messages[:i]` with the generation prompt ends where assistant turn `i`'s content starts, and that
turn ends at the first end-of-turn token after it. The rendered text is then tokenised piece by piece at
those boundaries. Piece boundaries sit right after a special token (exact: the tokenizer splits there
too) or right after the `<|im_start|>assistant\\n` header — the same split generation makes, since the
prompt is tokenised on its own and the reply is sampled after it. Tests check that the ids equal
tokenising the whole rendered string for the bundled tokenizer.

Labels use the *unshifted* convention: `labels[t]` is `input_ids[t]` when token `t` is an assistant
token, else -100; whoever builds next-token targets shifts by one (see `data/sft_stream.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from ..tokenizer import LFM2Tokenizer
from .packed import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")

# Why a row is unusable; stages count these and log them.
SKIP_REASONS = ("bad_format", "unknown_role", "empty_content", "no_assistant_turn", "template_error", "too_long")


class ChatFormatError(ValueError):
    """A conversation that cannot be trained on; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass
class EncodedChat:
    """One conversation: `input_ids` and unshifted `labels` (-100 outside assistant turns), same length."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain dicts with `None`-valued keys dropped.

    `datasets` stores a column of message lists as Arrow structs, filling every key any message has with
    None (a user turn gets `tool_calls: None`); dropping them makes a loaded row render like the original.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatFormatError("bad_format", f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatFormatError("bad_format", f"message {i} is {type(m).__name__}, not a dict")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _normalize_tools(tools: Any) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or \
            not all(isinstance(t, Mapping) for t in tools):
        raise ChatFormatError("bad_format", "tools must be a list of JSON-schema dicts")
    return [dict(t) for t in tools] or None


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Structural checks that need no tokenizer; returns the normalised messages or raises ChatFormatError."""
    msgs = normalize_messages(messages)
    for i, m in enumerate(msgs):
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError("unknown_role", f"message {i} has role {role!r}; allowed: {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ChatFormatError("bad_format", f"message {i} content is {type(content).__name__}, not a string")
        has_calls = role == "assistant" and bool(m.get("tool_calls"))
        if "tool_calls" in m and not has_calls and m["tool_calls"]:
            raise ChatFormatError("bad_format", f"message {i}: only assistant turns may carry tool_calls")
        if not has_calls and not (content or "").strip():
            raise ChatFormatError("empty_content", f"message {i} ({role}) has empty content")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ChatFormatError("no_assistant_turn", "the conversation has no assistant turn to learn from")
    return msgs


def _render(tokenizer: LFM2Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
            add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    except (jinja2.exceptions.TemplateError, TypeError) as err:
        raise ChatFormatError("template_error", f"the chat template rejected the conversation: {err}") from err


def assistant_spans(tokenizer: LFM2Tokenizer, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, per assistant turn, the character span [start, end) that carries labels:
    the turn's content (tool calls included) through its end-of-turn token."""
    text = _render(tokenizer, messages, tools, add_generation_prompt=False)
    eos = tokenizer.eos_token
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], tools, add_generation_prompt=True)
        if not text.startswith(prefix):
            raise ChatFormatError("template_error", "the chat template is not prefix-stable: the prompt for "
                                  f"assistant turn {i} is not a prefix of the whole conversation")
        end = text.find(eos, len(prefix))
        if end < 0:
            raise ChatFormatError("template_error", f"assistant turn {i} is not closed by {eos!r}")
        spans.append((len(prefix), end + len(eos)))
    return text, spans


def encode_conversation(tokenizer: LFM2Tokenizer, messages: Any, tools: Any = None,
                        max_length: int | None = None) -> EncodedChat:
    """Token ids and labels for a whole conversation; raises ChatFormatError for an unusable one.

    `max_length` (tokens) rejects conversations that do not fit the training context ("too_long").
    """
    msgs = validate_messages(messages)
    tool_list = _normalize_tools(tools)
    text, spans = assistant_spans(tokenizer, msgs, tool_list)
    ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for start, end in spans:
        before = tokenizer.encode(text[pos:start])
        turn = tokenizer.encode(text[start:end])
        ids += before + turn
        labels += [IGNORE_INDEX] * len(before) + turn
        pos = end
    tail = tokenizer.encode(text[pos:])
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    if max_length is not None and len(ids) > max_length:
        raise ChatFormatError("too_long", f"{len(ids)} tokens > max_length={max_length}")
    return EncodedChat(ids, labels)


def encode_prompt_completion(tokenizer: LFM2Tokenizer, prompt_messages: Any, completion: str,
                             tools: Any = None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the prompt rendered with the generation prompt, the completion as the
    assistant's content plus `<|im_end|>`. `prompt + completion` equals the ids of `encode_conversation`
    over `prompt_messages + [assistant: completion]` up to and including that turn's end-of-turn token."""
    prompt = normalize_messages(prompt_messages)
    if not isinstance(completion, str) or not completion.strip():
        raise ChatFormatError("empty_content", "the completion is empty")
    msgs = validate_messages(prompt + [{"role": "assistant", "content": completion}])
    tool_list = _normalize_tools(tools)
    text, spans = assistant_spans(tokenizer, msgs, tool_list)
    start, end = spans[-1]
    return tokenizer.encode(text[:start]), tokenizer.encode(text[start:end])


def classify_row(tokenizer: LFM2Tokenizer, messages: Any, tools: Any = None,
                 max_length: int | None = None) -> str | None:
    """None when the row is usable, else its skip reason (one of `SKIP_REASONS`)."""
    try:
        encode_conversation(tokenizer, messages, tools, max_length)
    except ChatFormatError as err:
        return err.reason
    return None
