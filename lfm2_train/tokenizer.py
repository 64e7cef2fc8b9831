"""LFM2 tokenizer: load, save, chat-format and fingerprint a Hugging Face ``tokenizer.json``.

We wrap ``tokenizers.Tokenizer`` directly instead of ``transformers.AutoTokenizer`` so that training,
data pipelines and tests do not need ``transformers`` at runtime, while ``save_pretrained`` still writes
files that ``AutoTokenizer.from_pretrained`` loads to the same ids and the same chat rendering.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    from omegaconf import DictConfig

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|startoftext|>"
EOD_TOKEN = "<|endoftext|>"  # separates documents in packed pretraining data
EOS_TOKEN = "<|im_end|>"  # end of a chat turn: what generation stops on

# Token string -> id, in id order. Any LFM2-compatible vocab must hold exactly these ids, because the
# model's embeddings, the data shards and any teacher used for distillation all agree on them.
LFM2_SPECIAL_TOKENS: dict[str, int] = {
    PAD_TOKEN: 0,
    BOS_TOKEN: 1,
    EOD_TOKEN: 2,
    "<|fim_pre|>": 3,
    "<|fim_mid|>": 4,
    "<|fim_suf|>": 5,
    "<|im_start|>": 6,
    EOS_TOKEN: 7,
    "<|tool_list_start|>": 8,
    "<|tool_list_end|>": 9,
    "<|tool_call_start|>": 10,
    "<|tool_call_end|>": 11,
    "<|tool_response_start|>": 12,
    "<|tool_response_end|>": 13,
}

DEFAULT_MODEL_MAX_LENGTH = 32768

# ChatML plus LFM2's tool tokens. Every tag uses '-' whitespace control so the output is exactly the
# strings emitted below, independent of the template's own indentation. Tool schemas go into the system
# turn; assistant tool calls are a JSON list of {"name", "arguments"} in front of the assistant's text.
LFM2_CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- set ns = namespace(system=none, first=0) -%}
{%- if messages and messages[0].role == "system" -%}
    {%- set ns.system = messages[0].content -%}
    {%- set ns.first = 1 -%}
{%- endif -%}
{%- if tools -%}
    {%- set tool_list = "List of tools: <|tool_list_start|>" + (tools | tojson) + "<|tool_list_end|>" -%}
    {%- set ns.system = (ns.system + "\n" + tool_list) if ns.system else tool_list -%}
{%- endif -%}
{%- if ns.system is not none -%}
    {{- "<|im_start|>system\n" + ns.system + "<|im_end|>\n" -}}
{%- endif -%}
{%- for message in messages[ns.first:] -%}
    {%- if message.role not in ["system", "user", "assistant", "tool"] -%}
        {{- raise_exception("Unsupported chat role: " + message.role) -}}
    {%- endif -%}
    {%- if message.content is string -%}
        {%- set content = message.content -%}
    {%- elif message.content is defined and message.content is not none -%}
        {%- set content = message.content | tojson -%}
    {%- else -%}
        {%- set content = "" -%}
    {%- endif -%}
    {%- if message.role == "assistant" and message.tool_calls -%}
        {%- set calls = namespace(items=[]) -%}
        {%- for call in message.tool_calls -%}
            {%- set fn = call.function if call.function is defined else call -%}
            {%- set args = fn.arguments | default({}) -%}
            {%- set args = args if args is string else (args | tojson) -%}
            {%- set call_json = '{"name": ' + (fn.name | tojson) + ', "arguments": ' + args + '}' -%}
            {%- set calls.items = calls.items + [call_json] -%}
        {%- endfor -%}
        {%- set call_list = "[" + (calls.items | join(", ")) + "]" -%}
        {%- set content = "<|tool_call_start|>" + call_list + "<|tool_call_end|>" + content -%}
    {%- endif -%}
    {%- if message.role == "tool" -%}
        {%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}
    {%- endif -%}
    {{- "<|im_start|>" + message.role + "\n" + content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
{%- endif -%}
"""


def tiny_tokenizer_path() -> Path:
    """The bundled 512-token tokenizer, so tests and smoke runs need no download."""
    return Path(__file__).resolve().parent / "assets" / "tokenizer_tiny"


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as serialized AddedToken dicts.
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Same as transformers' override: jinja's builtin tojson HTML-escapes, which would change the tokens.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile_chat_template(template: str) -> jinja2.Template:
    # Mirror transformers' environment exactly: templates come from checkpoints and are untrusted, and the
    # whitespace options change the rendered text.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class LFM2Tokenizer:
    """Byte-level BPE tokenizer with LFM2's special tokens and ChatML chat template."""

    def __init__(
        self,
        backend: Tokenizer,
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        chat_template: str = LFM2_CHAT_TEMPLATE,
        add_bos_token: bool | None = None,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> None:
        for token in (bos_token, eos_token, pad_token):
            if backend.token_to_id(token) is None:
                raise ValueError(f"tokenizer vocab lacks special token {token!r}")
        self._tok = backend
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template = chat_template
        self.model_max_length = int(model_max_length)
        # Same rule as transformers: an explicit add_bos_token (or a missing post-processor) replaces the
        # tokenizer.json post-processor, otherwise tokenizer.json decides; so add_special_tokens=True agrees.
        if add_bos_token is not None or backend.post_processor is None:
            single = f"{bos_token}:0 $A:0" if add_bos_token else "$A:0"
            pair = f"{single} {bos_token}:1 $B:1" if add_bos_token else "$A:0 $B:1"
            special = [(bos_token, self.bos_token_id)] if add_bos_token else []
            backend.post_processor = processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=special
            )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, required_special_tokens: Mapping[str, int] | None = LFM2_SPECIAL_TOKENS
    ) -> LFM2Tokenizer:
        """Load a HF-format tokenizer from a directory or a ``tokenizer.json`` file.

        ``required_special_tokens`` (token -> id) is checked so a vocab whose special ids differ from what the
        model and data were built with fails at load time, not as silently wrong training targets.
        """
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path does not exist: {path}")
        tok_file = path / "tokenizer.json" if path.is_dir() else path
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {tok_file}")
        root = tok_file.parent
        config: dict[str, Any] = {}
        if (root / "tokenizer_config.json").is_file():
            config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))

        backend = Tokenizer.from_file(str(tok_file))
        for token, expected in (required_special_tokens or {}).items():
            found = backend.token_to_id(token)
            if found is None:
                raise ValueError(f"{tok_file} lacks required special token {token!r}")
            if found != expected:
                raise ValueError(f"{tok_file}: special token {token!r} has id {found}, expected {expected}")

        template = config.get("chat_template")
        if isinstance(template, list):  # HF's named-template form
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (root / "chat_template.jinja").is_file():  # transformers prefers the separate file too
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        max_len = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if not isinstance(max_len, int) or max_len >= 2**31:  # HF writes 1e30 for "unset"
            max_len = DEFAULT_MODEL_MAX_LENGTH
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")) or BOS_TOKEN,
            eos_token=_token_content(config.get("eos_token")) or EOS_TOKEN,
            pad_token=_token_content(config.get("pad_token")) or PAD_TOKEN,
            chat_template=template or LFM2_CHAT_TEMPLATE,
            add_bos_token=config.get("add_bos_token"),
            model_max_length=max_len,
        )

    # ----------------------------------------------------------------------------------------- properties
    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``, for fast batch work in data pipelines."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Size including added/special tokens: what the embedding table must cover."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int:
        return self._tok.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self._tok.token_to_id(self.pad_token)

    @property
    def eod_token_id(self) -> int | None:
        """Document separator used when packing pretraining text."""
        return self._tok.token_to_id(EOD_TOKEN)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id, in id order."""
        added = self._tok.get_added_tokens_decoder()
        return {tok.content: i for i, tok in sorted(added.items()) if tok.special}

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(..., add_special_tokens=True)`` prepends bos; probed, so tokenizer.json counts."""
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids for ``text``. Special-token strings inside ``text`` map to their ids (as in HF)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads) — the fast path for data pipelines."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text for ``ids``; accepts lists, tuples, numpy arrays or 1-D tensors."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # -------------------------------------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render ``messages`` with the chat template (as transformers does) and optionally tokenize.

        The rendered text already starts with bos, so tokenization never adds special tokens again.
        """
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON-schema dicts")
        text = _compile_chat_template(self.chat_template).render(
            messages=list(messages),
            tools=list(tools) if tools is not None else None,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            **template_kwargs,
        )
        return self.encode(text) if tokenize else text

    # ------------------------------------------------------------------------------------ save / identity
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write HF-format files that both ``from_pretrained`` and ``transformers.AutoTokenizer`` load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        tokens = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tokens,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": self.chat_template,
        }
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", tokens)):
            text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
            (directory / name).write_text(text, encoding="utf-8")
        return directory

    def fingerprint(self) -> str:
        """sha256 over vocab, merges and special tokens: equal iff text maps to the same ids.

        Used to refuse pairing a student with a teacher, or a model with data shards, built on another vocab.
        Config-only fields (chat template, max length) are deliberately excluded.
        """
        merges = json.loads(self._tok.to_str()).get("model", {}).get("merges", [])
        merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]
        payload = {
            "vocab": sorted(self._tok.get_vocab(with_added_tokens=True).items()),
            "merges": merges,
            "special_tokens": sorted(self.special_tokens.items(), key=lambda kv: kv[1]),
        }
        blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Mapping[str, int] | Sequence[str] = LFM2_SPECIAL_TOKENS,
    *,
    min_frequency: int = 0,
) -> LFM2Tokenizer:
    """Train a byte-level BPE tokenizer whose special tokens take ids 0..n-1, in the given order.

    Small on purpose (tiny test vocabs, quick experiments); the full corpus job lives in data_pipelines.
    Deterministic for the same texts in the same order.
    """
    if isinstance(special_tokens, Mapping):
        ordered = sorted(special_tokens, key=special_tokens.__getitem__)
        if [special_tokens[t] for t in ordered] != list(range(len(ordered))):
            raise ValueError("special token ids must be 0..n-1 so the trainer can place them first")
    else:
        ordered = list(special_tokens)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=ordered,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return LFM2Tokenizer(backend, add_bos_token=True)


# ---- which tokenizer a stage uses ----------------------------------------------------------------------

def model_tokenizer_dir(init_from: str | None) -> Path | None:
    """The directory holding `model.init_from`'s own tokenizer, if it has one."""
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return Path(init_from)
    return None


def resolve_tokenizer(stage: DictConfig, init_from: str | None) -> LFM2Tokenizer:
    """`stage.tokenizer`, else the tokenizer saved with `model.init_from`, else the bundled tiny one (the
    tokenizer a training stage without token shards, sft or preference, encodes its data with)."""
    if stage.tokenizer:
        return LFM2Tokenizer.from_pretrained(stage.tokenizer)
    if init_from and (Path(init_from) / "tokenizer.json").is_file():
        return LFM2Tokenizer.from_pretrained(init_from)
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def checkpoint_tokenizer(stage: DictConfig, checkpoint: str | None, vocab_size: int) -> LFM2Tokenizer:
    """The tokenizer to run a checkpoint with (generate, eval): its own wins; an explicit `stage.tokenizer`
    overrides; else the bundled one. Refused when it has more tokens than the model's `vocab_size`."""
    if stage.tokenizer:
        path = Path(stage.tokenizer)
    elif checkpoint and (Path(checkpoint) / "tokenizer.json").is_file():
        path = Path(checkpoint)
    elif checkpoint:
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json; pass stage.tokenizer=<dir>")
    else:
        path = tiny_tokenizer_path()
    tokenizer = LFM2Tokenizer.from_pretrained(path)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer at {path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{vocab_size}: they were not made for each other"
        )
    return tokenizer
