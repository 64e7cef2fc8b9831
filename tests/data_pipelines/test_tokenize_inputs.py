"""The tokenize job's inputs: file formats, mixture weights and budgets, and every bad input refused with the
source's name before a single shard is written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from data_pipelines.sources import SourceError
from data_pipelines.tokenize import TokenizeError, run
from lfm2_train.data.format import ShardReader, load_manifest
from lfm2_train.tokenizer import LFM2_SPECIAL_TOKENS, LFM2Tokenizer


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def words(prefix: str, n: int, length: int = 6) -> list[str]:
    """n distinct short documents whose text says which source they came from."""
    return [f"{prefix} {i}: " + " ".join(f"{prefix}{(i * 7 + j) % 13}" for j in range(length)) for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    return {"a": write_jsonl(d / "a.jsonl", [{"text": t} for t in words("alpha", 200)]),
            "b": write_jsonl(d / "b.jsonl", [{"text": t} for t in words("beta", 100)]),
            "c": write_jsonl(d / "c.jsonl", [{"text": t} for t in words("gamma", 50, length=30)])}


def job(out: Path, hf_cache: str, sources: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return run({"sources": sources, "output_dir": str(out), "cache_dir": hf_cache, "progress": False,
                "shard_tokens": 3000, "fim": {"rate": 0.0}, **kw})


def per_source(out: Path) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in load_manifest(out).sources}


def max_doc(out: Path) -> int:
    return int(ShardReader(out).doc_lengths().max())


# ---------------------------------------------------------------------------------------------- formats
def test_parquet_text_and_directory_sources(tmp_path: Path, hf_cache: str, tok: LFM2Tokenizer) -> None:
    pq.write_table(pa.table({"body": ["first parquet doc", "second parquet doc"], "n": [1, 2]}), tmp_path / "p.parquet")
    (tmp_path / "t.txt").write_text("para one\nstill one\n\npara two\n")
    sub = tmp_path / "dir"
    sub.mkdir()
    write_jsonl(sub / "2.jsonl", [{"text": "from file two", "lang": "en"}])  # other columns may differ
    write_jsonl(sub / "1.jsonl", [{"text": "from file one", "score": 0.5}])
    (sub / "empty.jsonl").write_text("")  # skipped with a warning
    (sub / "notes.csv").write_text("ignored,because,not a known extension\n")
    out = tmp_path / "ds"
    job(out, hf_cache, [{"name": "p", "path": str(tmp_path / "p.parquet"), "text_field": "body", "token_budget": 1},
                        {"name": "t", "path": str(tmp_path / "t.txt"), "sample_by": "paragraph", "token_budget": 1},
                        {"name": "d", "path": str(sub), "token_budget": 1}])
    reader = ShardReader(out)
    got = sorted(tok.decode(reader.document(i)[:-1]) for i in range(len(reader)))
    # a budget of 1 token takes exactly one document from each source: the first in file order
    assert got == ["first parquet doc", "from file one", "para one\nstill one"]
    assert per_source(out)["d"]["files"] == 2


# ---------------------------------------------------------------------------------------------- mixtures
def test_weights_with_total_tokens(tmp_path: Path, hf_cache: str, files: dict[str, Path], tok: LFM2Tokenizer) -> None:
    out = tmp_path / "ds"
    job(out, hf_cache, [{"name": "a", "path": str(files["a"]), "weight": 3.0},
                        {"name": "b", "path": str(files["b"]), "weight": 1.0}], total_tokens=20_000)
    src, longest = per_source(out), max_doc(out)
    for name, share in (("a", 0.75), ("b", 0.25)):
        target = round(20_000 * share)
        assert src[name]["target_tokens"] == target
        assert target <= src[name]["tokens"] < target + longest  # the last document may overshoot
    assert src["b"]["epochs"] > 1  # b is too small for its share: repeated
    # documents are interleaved, not one source after the other: both appear early and late
    reader = ShardReader(out)
    first = [tok.decode(reader.document(i)[:8]) for i in range(12)]
    last = [tok.decode(reader.document(i)[:8]) for i in range(len(reader) - 12, len(reader))]
    for chunk in (first, last):
        assert any(t.startswith("alpha") for t in chunk) and any(t.startswith("beta") for t in chunk)


def test_token_budgets_and_repetition(tmp_path: Path, hf_cache: str, files: dict[str, Path],
                                      tok: LFM2Tokenizer) -> None:
    out = tmp_path / "ds"
    job(out, hf_cache, [{"name": "b", "path": str(files["b"]), "token_budget": 500},
                        {"name": "c", "path": str(files["c"]), "token_budget": 12_000}])
    src, longest = per_source(out), max_doc(out)
    for name, budget in (("b", 500), ("c", 12_000)):
        assert budget <= src[name]["tokens"] < budget + longest
    assert src["c"]["epochs"] > 1 and src["c"]["documents"] == src["c"]["rows_read"]
    # a repeated plain document is the same document again
    reader = ShardReader(out)
    decoded = [tok.decode(reader.document(i)[:-1]) for i in range(len(reader))]
    assert decoded.count(words("gamma", 50, length=30)[0]) == 2


def test_largest_weight_source_is_read_exactly_once(tmp_path: Path, hf_cache: str, files: dict[str, Path]) -> None:
    out = tmp_path / "ds"
    job(out, hf_cache, [{"name": "b", "path": str(files["b"]), "weight": 1.0},
                        {"name": "a", "path": str(files["a"]), "weight": 2.0},
                        {"name": "c", "path": str(files["c"]), "weight": 1.0}])
    src, longest = per_source(out), max_doc(out)
    assert src["a"]["rows_read"] == src["a"]["documents"] == 200 and src["a"]["epochs"] == 1.0
    for name in ("b", "c"):
        target = int(np.ceil(src["a"]["tokens"] / 2))
        assert src[name]["target_tokens"] == target
        assert target <= src[name]["tokens"] < target + longest


def test_budgets_plus_weights_need_total_tokens(tmp_path: Path, hf_cache: str, files: dict[str, Path]) -> None:
    sources = [{"name": "a", "path": str(files["a"]), "weight": 1.0},
               {"name": "b", "path": str(files["b"]), "token_budget": 1000}]
    with pytest.raises(TokenizeError, match="set total_tokens"):
        job(tmp_path / "x", hf_cache, sources)
    out = tmp_path / "ds"
    job(out, hf_cache, sources, total_tokens=6000)
    src = per_source(out)
    assert src["b"]["target_tokens"] == 1000 and src["a"]["target_tokens"] == 5000
    with pytest.raises(TokenizeError, match="leaves nothing"):
        job(tmp_path / "y", hf_cache, sources, total_tokens=900)


# ---------------------------------------------------------------------------------------------- bad input
def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or not any(p.name.startswith(("shard-", "manifest")) for p in out.iterdir())


@pytest.mark.parametrize("case", ["missing", "glob", "corrupt_json", "corrupt_parquet", "empty_file",
                                  "no_rows_text", "missing_field", "int_field", "unknown_extension",
                                  "one_bad_file", "invalid_utf8"])
def test_bad_source_is_named_before_any_shard(tmp_path: Path, hf_cache: str, files: dict[str, Path],
                                              case: str) -> None:
    bad: dict[str, Any] = {"name": "broken", "weight": 1.0}
    expect = {
        "missing": "does not exist", "glob": "no file matches", "corrupt_json": "cannot read",
        "corrupt_parquet": "cannot read", "empty_file": "empty source", "no_rows_text": "empty or null",
        "missing_field": "text field 'content' not found", "int_field": "not strings",
        "unknown_extension": "cannot tell the format", "one_bad_file": r"cannot read \S*2\.jsonl, line 2",
        "invalid_utf8": r"cannot read \S*u\.jsonl, line 2: invalid UTF-8",
    }[case]
    if case == "missing":
        bad["path"] = str(tmp_path / "nope.jsonl")
    elif case == "glob":
        bad["path"] = str(tmp_path / "nothing-*.jsonl")
    elif case == "corrupt_json":
        (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
        bad["path"] = str(tmp_path / "c.jsonl")
    elif case == "corrupt_parquet":
        (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
        bad["path"] = str(tmp_path / "c.parquet")
    elif case == "empty_file":
        (tmp_path / "e.jsonl").write_text("")
        bad["path"] = str(tmp_path / "e.jsonl")
    elif case == "no_rows_text":
        bad["path"] = str(write_jsonl(tmp_path / "n.jsonl", [{"text": ""}, {"text": None}]))
    elif case == "missing_field":
        bad["path"], bad["text_field"] = str(files["a"]), "content"
    elif case == "int_field":
        bad["path"] = str(write_jsonl(tmp_path / "i.jsonl", [{"text": 1}, {"text": 2}]))
    elif case == "invalid_utf8":
        (tmp_path / "u.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        bad["path"] = str(tmp_path / "u.jsonl")
    elif case == "unknown_extension":
        (tmp_path / "data.csv").write_text("text\nhello\n")
        bad["path"] = str(tmp_path / "data.csv")
    else:  # a glob over three files, the last one broken: the message names that file
        for i in range(3):
            (tmp_path / f"part{i}.jsonl").write_text('{"text": "ok"}\n' if i != 2 else '{"text": "ok"}\n{"te')
        bad["path"] = str(tmp_path / "part*.jsonl")
    out = tmp_path / "out"
    good = {"name": "good", "path": str(files["a"]), "weight": 1.0}
    with pytest.raises(SourceError, match=f"source 'broken'.*{expect}"):
        job(out, hf_cache, [good, bad])  # the good source comes first: still nothing is written
    assert_nothing_written(out)


@pytest.mark.parametrize("change,match", [
    ({"weight": None}, "exactly one of weight and token_budget"),
    ({"token_budget": 10}, "exactly one of weight and token_budget"),
    ({"weight": 0.0}, "weight must be positive"),
])
def test_bad_mixture_entry_is_named(tmp_path: Path, hf_cache: str, files: dict[str, Path], change: dict[str, Any],
                                    match: str) -> None:
    with pytest.raises(SourceError, match=f"source 'a': .*{match}"):
        job(tmp_path / "out", hf_cache, [{"name": "a", "path": str(files["a"]), "weight": 1.0, **change}])
    assert_nothing_written(tmp_path / "out")


def test_duplicate_names_and_missing_tokenizer(tmp_path: Path, hf_cache: str, files: dict[str, Path]) -> None:
    a = {"name": "a", "path": str(files["a"]), "weight": 1.0}
    with pytest.raises(TokenizeError, match="unique"):
        job(tmp_path / "out", hf_cache, [a, a])
    with pytest.raises(TokenizeError, match="tokenizer .*does not exist"):
        job(tmp_path / "out", hf_cache, [a], tokenizer=str(tmp_path / "no-tokenizer"))
    assert_nothing_written(tmp_path / "out")


def big_vocab_tokenizer(directory: Path, size: int = 70_000) -> Path:
    """A byte-level 'BPE' without merges but with `size` ids: enough to overflow uint16, cheap to build."""
    vocab = {t: i for t, i in LFM2_SPECIAL_TOKENS.items()}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    while len(vocab) < size:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in LFM2_SPECIAL_TOKENS])
    LFM2Tokenizer(backend, add_bos_token=True).save_pretrained(directory)
    return directory


def test_id_dtype_follows_the_vocab_and_uint16_overflow_is_refused(tmp_path: Path, hf_cache: str,
                                                                   files: dict[str, Path]) -> None:
    big = big_vocab_tokenizer(tmp_path / "big")
    a = [{"name": "a", "path": str(files["a"]), "token_budget": 2000}]
    with pytest.raises(TokenizeError, match="70000 tokens.*do not fit dtype uint16"):
        job(tmp_path / "out", hf_cache, a, tokenizer=str(big), dtype="uint16")
    assert_nothing_written(tmp_path / "out")
    out = tmp_path / "ds"
    job(out, hf_cache, a, tokenizer=str(big))  # default: the smallest dtype that fits
    manifest = load_manifest(out)
    assert manifest.dtype == "uint32" and manifest.vocab_size == 70_000
    tok = LFM2Tokenizer.from_pretrained(big)
    assert tok.decode(ShardReader(out).document(0)[:-1]) == words("alpha", 1)[0]
    with pytest.raises(TokenizeError, match="uint16 or uint32"):
        job(tmp_path / "out2", hf_cache, a, dtype="int8")
