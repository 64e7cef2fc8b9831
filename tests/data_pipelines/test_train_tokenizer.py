"""The tokenizer training job: LFM2 special ids, deterministic output, offline loading in transformers with the
same ids, decoding and chat rendering, and clear errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from data_pipelines.sources import SourceError
from data_pipelines.train_tokenizer import TRAINING_INFO, TrainTokenizerError, register_configs, run
from lfm2_train.tokenizer import LFM2_SPECIAL_TOKENS, LFM2Tokenizer

SAMPLES = [
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n12 + 7 = 19<|im_end|>\n",
    "<|fim_pre|>def add(a, b):\n<|fim_suf|>    return c\n<|fim_mid|>    c = a + b\n<|endoftext|>",
    "Plain text, numbers 3.14159 and 2024-06-01, accents café naïve, CJK 東京, emoji 🙂, tabs\tand  spaces.",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("tok")
    (d / "a.jsonl").write_text("".join(json.dumps({"body": f"The value of item {i} is {i * 7}. café"}) + "\n"
                                       for i in range(300)))
    (d / "b.txt").write_text("def square(x):\n    return x * x\n" * 50)
    summary = run({"inputs": [str(d / "*.jsonl")], "text_field": "body", "vocab_size": 400,
                   "output_dir": str(d / "out"), "cache_dir": str(d / "hf")})
    return d, summary


def test_trained_tokenizer_has_lfm2_specials_and_round_trips(trained: tuple[Path, dict[str, Any]]) -> None:
    d, summary = trained
    tok = LFM2Tokenizer.from_pretrained(d / "out")  # checks every special id
    assert summary["vocab_size"] == tok.vocab_size == 400 and summary["documents"] == 300
    assert tok.special_tokens == LFM2_SPECIAL_TOKENS
    assert summary["fingerprint"] == tok.fingerprint()
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|fim_pre|><|endoftext|>") == [3, 2]
    info = json.loads((d / "out" / TRAINING_INFO).read_text())
    assert info["config"]["vocab_size"] == 400 and info["inputs"][0]["rows"] == 300


def test_transformers_loads_it_offline_with_the_same_ids(trained: tuple[Path, dict[str, Any]],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, _ = trained
    ours = LFM2Tokenizer.from_pretrained(d / "out")
    hf = transformers.AutoTokenizer.from_pretrained(str(d / "out"), local_files_only=True)
    assert len(hf) == ours.vocab_size
    assert hf.convert_tokens_to_ids(list(LFM2_SPECIAL_TOKENS)) == list(range(14))
    for text in SAMPLES:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text)
        assert hf.decode(ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_training_is_deterministic_and_refuses_to_overwrite(trained: tuple[Path, dict[str, Any]]) -> None:
    d, summary = trained
    cfg = {"inputs": [str(d / "a.jsonl")], "text_field": "body", "vocab_size": 400, "cache_dir": str(d / "hf")}
    with pytest.raises(TrainTokenizerError, match="already holds a tokenizer"):
        run({**cfg, "output_dir": str(d / "out")})
    again = run({**cfg, "output_dir": str(d / "again")})
    assert again["fingerprint"] == summary["fingerprint"]
    assert (d / "again" / "tokenizer.json").read_bytes() == (d / "out" / "tokenizer.json").read_bytes()
    assert run({**cfg, "output_dir": str(d / "out"), "overwrite": True})["fingerprint"] == summary["fingerprint"]


def test_max_documents_and_plain_text_inputs(trained: tuple[Path, dict[str, Any]]) -> None:
    d, _ = trained
    common = {"vocab_size": 300, "cache_dir": str(d / "hf")}
    capped = run({**common, "inputs": [str(d / "a.jsonl")], "text_field": "body", "max_documents": 10,
                  "output_dir": str(d / "capped")})
    assert capped["documents"] == 10
    text = run({**common, "inputs": [str(d / "b.txt")], "output_dir": str(d / "text")})
    assert text["documents"] == 1  # a plain-text file is one document
    with pytest.raises(SourceError, match=r"a\.jsonl.*text field 'text' not found"):  # checked before training
        run({**common, "inputs": [str(d / "b.txt"), str(d / "a.jsonl")], "output_dir": str(d / "bad")})
    assert not (d / "bad").exists()


def test_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(TrainTokenizerError, match="below 270"):
        run({"vocab_size": 100, "output_dir": str(tmp_path / "o")})
    with pytest.raises(SourceError, match="does not exist"):
        run({"inputs": [str(tmp_path / "missing.jsonl")], "output_dir": str(tmp_path / "o")})
    assert not (tmp_path / "o").exists()


def test_hydra_defaults_use_the_bundled_corpus() -> None:
    from hydra import compose, initialize

    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="train_tokenizer", overrides=["vocab_size=1024"])
    assert list(cfg.inputs) == [] and cfg.vocab_size == 1024 and cfg.text_field == "text"


@pytest.mark.slow
def test_default_job_on_the_bundled_corpus(tmp_path: Path) -> None:
    summary = run({"output_dir": str(tmp_path / "tok"), "cache_dir": str(tmp_path / "hf")})
    assert summary["vocab_size"] == 8192
    tok = LFM2Tokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok.encode("12 + 7 = 19\ndef add(a, b):\n    return a + b\n")) < 20
