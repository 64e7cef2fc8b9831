"""Preference pairs: load (prompt, chosen, rejected) rows, tokenise them, and batch chosen/rejected together.

Accepted row forms (any file `datasets` loads, see `chat_dataset.load_chat_rows`):
- TRL "conversational": `prompt` = a list of messages, `chosen` / `rejected` = a list holding one
  assistant message (a bare `{"role": "assistant", ...}` dict or a string works too);
- TRL "implicit prompt": no `prompt` column, `chosen` / `rejected` = whole conversations sharing the
  prompt turns and differing in their last assistant message;
- plain strings: `prompt`, `chosen`, `rejected` are text. With `plain_text="chat"` (default) the prompt
  becomes one user turn and the responses assistant turns, rendered with the chat template; with
  `plain_text="raw"` the texts are tokenised as they are (prompt with the tokenizer's bos, each response
  followed by the end-of-turn token).

A row that cannot be used is skipped and counted by reason (`PAIR_SKIP_REASONS`); no usable row is an
error naming the source and the counts. Pairs whose prompt plus longer response exceed `max_length` are
*skipped*, not truncated: cutting a chat prompt from the left drops the `<|startoftext|>` and system turn
the model was trained with, and cutting a response changes what is being preferred (a response may be
rejected for its tail).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..tokenizer import LFM2Tokenizer
from .chat import ROLES, ChatFormatError, encode_prompt_completion, normalize_messages
from .chat_dataset import ChatRows, load_chat_rows
from .packed import IGNORE_INDEX

PAIR_SKIP_REASONS = ("no_prompt", "bad_format", "unknown_role", "empty_content", "bad_completion", "template_error",
                     "identical", "too_long")


class PairFormatError(ValueError):
    """A pair that cannot be trained on; `reason` is one of `PAIR_SKIP_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason if reason in PAIR_SKIP_REASONS else "bad_format"


@dataclass(frozen=True)
class EncodedPair:
    prompt: tuple[int, ...]
    chosen: tuple[int, ...]  # completion ids, end-of-turn token included
    rejected: tuple[int, ...]
    row: int  # dataset row it came from

    @property
    def max_length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PreferencePairs:
    pairs: list[EncodedPair]
    source: str
    fingerprint: str  # of the source rows (files' bytes)
    skipped: Counter = field(default_factory=Counter)
    n_rows: int = 0
    shards: dict[str, Any] | None = None  # the chat shards they were read from (directory, manifest hash, cache)

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> str:
        why = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.source}: {self.n_rows} rows, {len(self.pairs)} usable pairs; skipped: {why}"

    def data_hash(self) -> str:
        """sha256 of the tokenised pairs in order: what the reference log-prob cache is keyed on."""
        return pairs_hash(self.pairs)


def pairs_hash(pairs: Sequence[EncodedPair]) -> str:
    h = hashlib.sha256(b"lfm2_train.preference_pairs/1\0")
    for p in pairs:
        for ids in (p.prompt, p.chosen, p.rejected):
            h.update(np.int64(len(ids)).tobytes())
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ row -> pair
def _completion_text(value: Any, what: str) -> str:
    """The assistant content of a response in any accepted form."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    try:
        msgs = normalize_messages(value)
    except ChatFormatError as err:
        raise PairFormatError("bad_format", f"{what}: {err}") from None
    if len(msgs) != 1:
        raise PairFormatError("bad_completion", f"{what} holds {len(msgs)} messages; expected one assistant turn")
    role = msgs[0].get("role")
    if role not in ROLES:
        raise PairFormatError("unknown_role", f"{what} has role {role!r}; allowed: {', '.join(ROLES)}")
    if role != "assistant" or msgs[0].get("tool_calls"):
        raise PairFormatError("bad_completion", f"{what} must be a plain assistant message, got role {role!r}"
                              + (" with tool_calls" if msgs[0].get("tool_calls") else ""))
    content = msgs[0].get("content")
    if not isinstance(content, str):
        raise PairFormatError("bad_format", f"{what} content is {type(content).__name__}, not a string")
    return content


def _split_implicit(chosen: Any, rejected: Any) -> tuple[list[dict[str, Any]], Any, Any]:
    """TRL's implicit-prompt form: the shared leading turns are the prompt, the last turns the responses."""
    c, r = normalize_messages(chosen), normalize_messages(rejected)
    if len(c) < 2 or len(c) != len(r) or c[:-1] != r[:-1]:
        raise PairFormatError("no_prompt", "no prompt column, and chosen/rejected do not share the prompt turns "
                              "before one final response each")
    return c[:-1], c[-1], r[-1]


def normalise_row(row: Mapping[str, Any], plain_text: str = "chat") -> tuple[Any, str, str, bool]:
    """-> (prompt: message list or raw text, chosen text, rejected text, raw?) or raise PairFormatError."""
    if not isinstance(row, Mapping):
        raise PairFormatError("bad_format", f"row is {type(row).__name__}, not a mapping")
    if "chosen" not in row or "rejected" not in row:
        raise PairFormatError("bad_format", f"row lacks chosen/rejected (keys: {sorted(row)})")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None and not isinstance(chosen, str) and not isinstance(rejected, str):
        try:
            prompt, chosen, rejected = _split_implicit(chosen, rejected)
        except ChatFormatError as err:
            raise PairFormatError("bad_format", str(err)) from None
    if prompt is None or (isinstance(prompt, (str, list, tuple)) and not prompt) or \
            (isinstance(prompt, str) and not prompt.strip()):
        raise PairFormatError("no_prompt", "the prompt is missing or empty")
    chosen_text = _completion_text(chosen, "chosen")
    rejected_text = _completion_text(rejected, "rejected")
    if isinstance(prompt, str):
        if plain_text == "raw":
            return prompt, chosen_text, rejected_text, True
        if plain_text != "chat":
            raise ValueError(f"plain_text={plain_text!r}; choose chat or raw")
        return [{"role": "user", "content": prompt}], chosen_text, rejected_text, False
    try:
        msgs = normalize_messages(prompt)
    except ChatFormatError as err:
        raise PairFormatError("bad_format", f"prompt: {err}") from None
    return msgs, chosen_text, rejected_text, False


def encode_pair(tokenizer: LFM2Tokenizer, row: Mapping[str, Any], *, max_length: int, plain_text: str = "chat",
                index: int = 0) -> EncodedPair:
    """Tokenise one row; raises PairFormatError (with its reason) when it is unusable."""
    prompt, chosen, rejected, raw = normalise_row(row, plain_text)
    for text, what in ((chosen, "chosen"), (rejected, "rejected")):
        if not text.strip():
            raise PairFormatError("empty_content", f"the {what} response is empty")
    if chosen == rejected:
        raise PairFormatError("identical", "chosen and rejected are the same text")
    tools = row.get("tools")
    if raw:
        p = tokenizer.encode(prompt, add_special_tokens=True)
        c = tokenizer.encode(chosen) + [tokenizer.eos_token_id]
        r = tokenizer.encode(rejected) + [tokenizer.eos_token_id]
    else:
        try:
            p, c = encode_prompt_completion(tokenizer, prompt, chosen, tools)
            p2, r = encode_prompt_completion(tokenizer, prompt, rejected, tools)
        except ChatFormatError as err:
            raise PairFormatError(err.reason, str(err)) from None
        if p != p2:
            raise PairFormatError("template_error", "the prompt tokenises differently before chosen and rejected")
    if c == r:
        raise PairFormatError("identical", "chosen and rejected tokenise to the same ids")
    pair = EncodedPair(tuple(p), tuple(c), tuple(r), index)
    if pair.max_length > max_length:
        raise PairFormatError("too_long", f"prompt {len(p)} + response {max(len(c), len(r))} tokens > "
                              f"max_length={max_length}")
    return pair


def encode_pairs(tokenizer: LFM2Tokenizer, rows: ChatRows, *, max_length: int, plain_text: str = "chat"
                 ) -> PreferencePairs:
    """Every usable pair, with skip counts; raises ValueError when none is usable."""
    pairs, skipped = [], Counter()
    for i, row in enumerate(rows.rows):
        try:
            pairs.append(encode_pair(tokenizer, row, max_length=max_length, plain_text=plain_text, index=i))
        except PairFormatError as err:
            skipped[err.reason] += 1
    out = PreferencePairs(pairs, rows.source, rows.fingerprint, skipped, len(rows))
    if not pairs:
        raise ValueError(f"no usable preference pair in {out.describe()}")
    return out


def load_preference_pairs(path: str | Path, tokenizer: LFM2Tokenizer, *, max_length: int, split: str = "train",
                          plain_text: str = "chat", cache_dir: str | None = None) -> PreferencePairs:
    """Load and tokenise a `datasets`-loadable pair file or directory."""
    if path is None:
        raise ValueError("stage=preference needs stage.dataset=<jsonl / parquet / dataset directory of pairs>")
    return encode_pairs(tokenizer, load_chat_rows(path, split=split, cache_dir=cache_dir), max_length=max_length,
                        plain_text=plain_text)


# ------------------------------------------------------------------------------------------ batches
def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int, ref_logps: np.ndarray | None = None,
                  index: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Pairs -> a batch, one row per response, right-padded to the longest:

    input_ids / doc_ids / targets (B, 2, T): [:, 0] chosen, [:, 1] rejected. doc_ids is 0 on real
    tokens and -1 on padding (masked by the model); targets[t] is the next token where that token is
    part of the completion, else IGNORE_INDEX, so the prompt and the padding never count.
    pair_index (B,): each pair's position in the full pair list (`index`, default 0..B-1); ref_logps
    (B, 2) float32, the rows of `ref_logps` (aligned with that full list) at `pair_index`, when given.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    T = max(p.max_length for p in pairs)
    B = len(pairs)
    ids = torch.full((B, 2, T), pad_id, dtype=torch.long)
    doc = torch.full((B, 2, T), -1, dtype=torch.long)
    tgt = torch.full((B, 2, T), IGNORE_INDEX, dtype=torch.long)
    for b, p in enumerate(pairs):
        for j, completion in enumerate((p.chosen, p.rejected)):
            seq = torch.tensor(p.prompt + completion, dtype=torch.long)
            n, P = len(seq), len(p.prompt)
            ids[b, j, :n] = seq
            doc[b, j, :n] = 0
            tgt[b, j, P - 1:n - 1] = seq[P:]
    batch = {"input_ids": ids, "doc_ids": doc, "targets": tgt}
    idx = torch.as_tensor(list(index) if index is not None else range(B), dtype=torch.long)
    batch["pair_index"] = idx
    if ref_logps is not None:
        batch["ref_logps"] = torch.from_numpy(np.asarray(ref_logps, dtype=np.float32)[idx.numpy()])
    return batch


class PairStream:
    """The trainer's batch source: pairs in a fresh seeded shuffle per epoch, resumable from one integer."""

    def __init__(self, pairs: Sequence[EncodedPair], pad_id: int, ref_logps: np.ndarray | None, seed: int,
                 index: Sequence[int] | None = None) -> None:
        if not pairs:
            raise ValueError("PairStream needs at least one pair")
        self.pairs = list(pairs)
        self.pad_id = pad_id
        self.ref_logps = ref_logps
        self.index = np.asarray(index if index is not None else range(len(pairs)), dtype=np.int64)
        self.seed = seed
        self.position = 0
        self._orders: dict[int, np.ndarray] = {}

    @staticmethod
    def normaliser(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The preference loss is a mean over pairs: the trainer divides the summed loss by this."""
        return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    @staticmethod
    def tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Real tokens (prompt and both responses, padding excluded), for tokens/s."""
        return (batch["doc_ids"] >= 0).sum()

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))}
        return self._orders[epoch]

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        n = len(self.pairs)
        chosen = []
        for pos in range(self.position, self.position + batch_size):
            chosen.append(int(self._order(pos // n)[pos % n]))
        self.position += batch_size
        return collate_pairs([self.pairs[i] for i in chosen], self.pad_id, self.ref_logps,
                             [int(self.index[i]) for i in chosen])

    def next_local_batch(self, global_rows: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        """Rank `rank`'s pairs of the next global batch of `global_rows` pairs, collated alone (padded to its
        own longest pair); the position moves past the whole global batch on every rank."""
        if global_rows % world_size:
            raise ValueError(f"{global_rows} pairs do not split evenly over {world_size} ranks")
        b, n = global_rows // world_size, len(self.pairs)
        start = self.position + rank * b
        chosen = [int(self._order(pos // n)[pos % n]) for pos in range(start, start + b)]
        self.position += global_rows
        return collate_pairs([self.pairs[i] for i in chosen], self.pad_id, self.ref_logps,
                             [int(self.index[i]) for i in chosen])

    @property
    def epoch(self) -> float:
        return self.position / len(self.pairs)

    @property
    def state(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])
