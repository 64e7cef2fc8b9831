"""Tests for lfm2_train.tokenizer: special ids, round trips, chat rendering, HF parity, fingerprints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from lfm2_train.tokenizer import (
    LFM2_SPECIAL_TOKENS,
    LFM2Tokenizer,
    checkpoint_tokenizer,
    model_tokenizer_dir,
    resolve_tokenizer,
    tiny_tokenizer_path,
    train_bpe_tokenizer,
)

TEXTS = [
    "the quick brown fox jumps over the lazy dog\n",
    "def f(x):\n    return x * 2\n",
    "a language model predicts the next token\n",
] * 20

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": '{"temp_c": 18}'},
    {"role": "assistant", "content": "18 °C in Paris."},
]


@pytest.fixture(scope="module")
def tok() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


def test_special_token_ids(tok: LFM2Tokenizer) -> None:
    assert list(LFM2_SPECIAL_TOKENS.values()) == list(range(14))
    assert tok.special_tokens == LFM2_SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.bos_token_id, tok.eod_token_id, tok.eos_token_id) == (0, 1, 2, 7)
    assert tok.vocab_size == 512
    for token, i in LFM2_SPECIAL_TOKENS.items():
        assert tok.encode(token) == [i]


def test_encode_decode_roundtrip_unicode(tok: LFM2Tokenizer) -> None:
    text = "Héllo wörld — 東京 🚀 naïve café\n\tdef f(x): return x**2  # ünïcode"
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "abc"]) == [ids, tok.encode("abc")]


def test_add_special_tokens_prepends_bos(tok: LFM2Tokenizer) -> None:
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_token_id, *tok.encode("hi")]
    ids = tok.encode("<|startoftext|>hi<|im_end|>")
    assert tok.decode(ids) == "<|startoftext|>hi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_chat_template_two_turns(tok: LFM2Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|startoftext|><|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert prompt == text + "<|im_start|>assistant\n"
    ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert ids == tok.encode(prompt)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_template_tools(tok: LFM2Tokenizer) -> None:
    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL], tokenize=False)
    assert text == (
        "<|startoftext|><|im_start|>system\nList of tools: <|tool_list_start|>"
        + json.dumps([WEATHER_TOOL], ensure_ascii=False)
        + "<|tool_list_end|><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<|tool_call_start|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
        "<|tool_call_end|><|im_end|>\n"
        '<|im_start|>tool\n<|tool_response_start|>{"temp_c": 18}<|tool_response_end|><|im_end|>\n'
        "<|im_start|>assistant\n18 °C in Paris.<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *TOOL_CONVERSATION[:1]]
    text = tok.apply_chat_template(with_system, tools=[WEATHER_TOOL], tokenize=False)
    assert text.startswith("<|startoftext|><|im_start|>system\nBe brief.\nList of tools: <|tool_list_start|>")
    assert text.count("<|im_start|>system") == 1
    ids = tok.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    for token in ("<|tool_list_start|>", "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_response_end|>"):
        assert LFM2_SPECIAL_TOKENS[token] in ids


def test_chat_template_rejects_unknown_role(tok: LFM2Tokenizer) -> None:
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="narrator"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)


def test_transformers_autotokenizer_parity(tok: LFM2Tokenizer, tmp_path: Path, monkeypatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))

    for text in ["Hello world!", "Héllo 東京 🚀\n    return x", "<|im_start|>user\nhi<|im_end|>"]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text, add_special_tokens=True)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 7, 0)
    assert len(hf) == tok.vocab_size

    for messages, tools in [(CONVERSATION, None), (TOOL_CONVERSATION, [WEATHER_TOOL])]:
        for gen in (False, True):
            ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
            theirs = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)
            assert theirs == ours
            out = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=True)
            theirs_ids = out if isinstance(out, list) else list(out["input_ids"])
            assert theirs_ids == tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen)


def test_fingerprint_stable_across_save_load(tok: LFM2Tokenizer, tmp_path: Path) -> None:
    fp = tok.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    reloaded = LFM2Tokenizer.from_pretrained(tok.save_pretrained(tmp_path / "copy"))
    assert reloaded.fingerprint() == fp
    assert LFM2Tokenizer.from_pretrained(tmp_path / "copy" / "tokenizer.json").fingerprint() == fp
    other = train_bpe_tokenizer(TEXTS, vocab_size=300)
    assert other.fingerprint() != fp


def test_from_pretrained_reads_config(tmp_path: Path) -> None:
    shutil.copytree(tiny_tokenizer_path(), tmp_path, dirs_exist_ok=True)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(eos_token={"content": "<|endoftext|>"}, add_bos_token=False, model_max_length=1024)
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages | length }}")
    t = LFM2Tokenizer.from_pretrained(tmp_path)
    assert t.eos_token_id == 2 and t.model_max_length == 1024
    assert t.encode("hi", add_special_tokens=True) == t.encode("hi")
    assert t.apply_chat_template(CONVERSATION, tokenize=False) == "<|startoftext|>4"


def test_missing_paths_raise_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        LFM2Tokenizer.from_pretrained(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        LFM2Tokenizer.from_pretrained(empty)


def test_missing_special_token_raises_value_error(tmp_path: Path) -> None:
    without_fim_mid = [s for s in LFM2_SPECIAL_TOKENS if s != "<|fim_mid|>"]
    t = train_bpe_tokenizer(TEXTS, vocab_size=300, special_tokens=without_fim_mid)
    # The constructor only needs bos/eos/pad; the full LFM2 set is enforced at load time.
    t.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"<\|fim_mid\|>"):
        LFM2Tokenizer.from_pretrained(tmp_path)
    assert LFM2Tokenizer.from_pretrained(tmp_path, required_special_tokens=None).vocab_size == 300


def test_train_bpe_tokenizer_deterministic() -> None:
    a = train_bpe_tokenizer(TEXTS, vocab_size=300)
    b = train_bpe_tokenizer(iter(TEXTS), vocab_size=300)
    assert a.fingerprint() == b.fingerprint()
    assert a.vocab_size == 300
    assert a.special_tokens == LFM2_SPECIAL_TOKENS
    text = "the lazy fox returns x * 2"
    assert a.encode(text) == b.encode(text) and a.decode(a.encode(text)) == text
    with pytest.raises(ValueError, match="0..n-1"):
        train_bpe_tokenizer(TEXTS, vocab_size=300, special_tokens={"<|pad|>": 1})


def test_bundled_tiny_tokenizer_matches_script() -> None:
    """The committed asset must be what the script produces, so nobody edits it by hand."""
    import importlib.util

    script = tiny_tokenizer_path().parent / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = train_bpe_tokenizer(module.corpus(), vocab_size=module.VOCAB_SIZE)
    assert rebuilt.fingerprint() == LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).fingerprint()


def test_which_tokenizer_a_stage_uses(tmp_path):
    """A model directory's own tokenizer, else an explicit one, else the bundled tiny one; a checkpoint without
    a tokenizer, or a tokenizer larger than the model's vocabulary, is refused by name."""
    tiny = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    own = tmp_path / "model"
    train_bpe_tokenizer(TEXTS, vocab_size=300).save_pretrained(own)
    bare = tmp_path / "bare"
    bare.mkdir()
    none = SimpleNamespace(tokenizer=None)
    assert model_tokenizer_dir(str(own)) == own and model_tokenizer_dir(str(bare)) is None
    assert model_tokenizer_dir(None) is None
    assert resolve_tokenizer(none, str(own)).fingerprint() != tiny.fingerprint()
    assert resolve_tokenizer(none, str(bare)).fingerprint() == tiny.fingerprint()
    assert resolve_tokenizer(SimpleNamespace(tokenizer=str(tiny_tokenizer_path())), str(own)).fingerprint() == \
        tiny.fingerprint()
    assert checkpoint_tokenizer(none, None, 512).fingerprint() == tiny.fingerprint()
    assert checkpoint_tokenizer(none, str(own), 512).vocab_size <= 300
    with pytest.raises(FileNotFoundError, match=f"{bare} has no tokenizer.json"):
        checkpoint_tokenizer(none, str(bare), 512)
    with pytest.raises(ValueError, match="the model's vocab_size is 64"):
        checkpoint_tokenizer(none, str(own), 64)
