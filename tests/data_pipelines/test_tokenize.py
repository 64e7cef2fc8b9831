"""The tokenize job: exact round trips, the FIM layout and rate, worker-count independence, byte-identical
resume after a crash, tamper detection, and refusing to clobber another config's dataset."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import data_pipelines.tokenize as tokenize_mod
from data_pipelines.fim import PSM, SPM, document_uniforms, fim_mode, fim_split
from data_pipelines.tokenize import STATE_FILE, TokenizeError, run
from lfm2_train.data.format import DataFormatError, ShardReader, load_manifest, verify_shards, write_shard
from lfm2_train.tokenizer import LFM2_SPECIAL_TOKENS, LFM2Tokenizer, tiny_tokenizer_path, train_bpe_tokenizer

PRE, MID, SUF, SEP = (LFM2_SPECIAL_TOKENS[t] for t in ("<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>", "<|endoftext|>"))
BUNDLED = Path(tiny_tokenizer_path()).parent / "corpus"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def bundled_rows(name: str, n: int) -> list[dict[str, Any]]:
    with open(BUNDLED / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A prose source (with special-token strings and non-ASCII text inside) and a code source."""
    d = tmp_path_factory.mktemp("corpus")
    prose = [r["text"] for r in bundled_rows("prose", 120)]
    prose[3] = "A document that mentions <|endoftext|> and <|fim_pre|> literally: café, 東京, naïve.\n"
    prose[7] = ""  # empty rows are skipped, not written as separator-only documents
    code = [r["text"] for r in bundled_rows("code", 150)]
    return {"prose": write_jsonl(d / "prose.jsonl", [{"text": t, "id": i} for i, t in enumerate(prose)]),
            "code": write_jsonl(d / "code.jsonl", [{"text": t} for t in code])}


def job(out: Path, hf_cache: str, sources: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    cfg = {"sources": sources, "output_dir": str(out), "cache_dir": hf_cache, "progress": False,
           "shard_tokens": 4000, **kw}
    return run(cfg)


def mixed(corpus: dict[str, Path]) -> list[dict[str, Any]]:
    return [{"name": "prose", "path": str(corpus["prose"]), "weight": 1.0},
            {"name": "code", "path": str(corpus["code"]), "weight": 1.0, "code": True}]


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- round trip
def test_shards_decode_back_to_the_source_documents(tmp_path: Path, hf_cache: str, corpus: dict[str, Path],
                                                    tok: LFM2Tokenizer) -> None:
    out = tmp_path / "ds"
    summary = job(out, hf_cache, [{"name": "prose", "path": str(corpus["prose"]), "weight": 1.0}], shard_tokens=3000)
    expected = [t for t in texts(corpus["prose"]) if t]
    manifest = verify_shards(out)
    assert summary["status"] == "complete" and summary["shards"] == len(manifest.shards) > 2
    assert manifest.dtype == "uint16" and manifest.separator_id == SEP and manifest.vocab_size == 512
    assert manifest.tokenizer_fingerprint == tok.fingerprint()
    assert not (out / STATE_FILE).exists()
    reader = ShardReader(out)
    assert len(reader) == len(expected) == manifest.num_documents
    for i, text in enumerate(expected):
        doc = reader.document(i)
        assert doc[-1] == SEP and SEP not in doc[:-1]  # the literal "<|endoftext|>" stayed text
        assert tok.decode(doc[:-1]) == text
    src = manifest.sources[0]
    assert src["skipped_empty"] == 1 and src["rows_read"] == src["rows"] == 120 and src["epochs"] == 1.0
    # documents never span shards, and a shard closes before a document would take it past shard_tokens
    assert all(s.tokens <= 3000 or s.documents == 1 for s in manifest.shards)
    assert manifest.extra["config"]["tokenizer"] == str(tiny_tokenizer_path())
    # the dataset carries its tokenizer where the trainer looks for it
    assert LFM2Tokenizer.from_pretrained(out / "tokenizer").fingerprint() == manifest.tokenizer_fingerprint


def test_a_different_tokenizer_in_the_output_dir_is_refused(tmp_path: Path, hf_cache: str,
                                                             corpus: dict[str, Path]) -> None:
    out = tmp_path / "ds"
    other = train_bpe_tokenizer(["some other text entirely"] * 20, vocab_size=280)
    other.save_pretrained(out / "tokenizer")
    sources = [{"name": "prose", "path": str(corpus["prose"]), "token_budget": 500}]
    with pytest.raises(TokenizeError, match="different tokenizer"):
        job(out, hf_cache, sources)
    assert not (out / "manifest.json").exists()
    # using that tokenizer is fine (and leaves it untouched); so is overwrite=true with another one
    before = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert job(out, hf_cache, sources, tokenizer=str(out / "tokenizer"))["status"] == "complete"
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == before
    job(out, hf_cache, sources, overwrite=True)
    assert LFM2Tokenizer.from_pretrained(out / "tokenizer").vocab_size == 512


# ---------------------------------------------------------------------------------------------------- FIM
def parse_fim(doc: np.ndarray, tok: LFM2Tokenizer, mode: int) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of a FIM document, checking the documented layout on the way.

    A PSM document with an empty prefix starts <pre> <suf> like SPM (and means the same thing: SPM with an
    empty prefix), so the mode comes from the document's draws rather than from its first tokens.
    """
    ids = doc.tolist()
    assert ids[-1] == SEP and ids.count(SEP) == 1
    assert ids[0] == PRE and ids.count(PRE) == ids.count(MID) == ids.count(SUF) == 1
    m = ids.index(MID)
    if mode == SPM:  # <pre> <suf> suffix <mid> prefix middle <eot>
        assert ids[1] == SUF
        return tok.decode(ids[m + 1:-1]), "", tok.decode(ids[2:m])  # the prefix/middle boundary is unmarked
    s = ids.index(SUF)  # PSM: <pre> prefix <suf> suffix <mid> middle <eot>
    assert mode == PSM and s < m
    return tok.decode(ids[1:s]), tok.decode(ids[m + 1:-1]), tok.decode(ids[s + 1:m])


def draws(i: int, rate: float, spm_rate: float, seed: int = 0, source: str = "code") -> tuple[int, float, float]:
    u_fim, u_spm, u_a, u_b = document_uniforms(seed, source, 0, i)
    return fim_mode(u_fim, u_spm, rate, spm_rate), u_a, u_b


def test_fim_layout_psm_and_spm(tmp_path: Path, hf_cache: str, corpus: dict[str, Path], tok: LFM2Tokenizer) -> None:
    out = tmp_path / "ds"
    job(out, hf_cache, [{"name": "code", "path": str(corpus["code"]), "weight": 1.0, "code": True}],
        fim={"rate": 1.0, "spm_rate": 0.5})
    reader = ShardReader(out)
    modes = []
    for i, text in enumerate(texts(corpus["code"])):
        mode, u_a, u_b = draws(i, 1.0, 0.5)  # the document's own draws decide mode and cut points
        prefix, middle, suffix = parse_fim(reader.document(i), tok, mode)
        assert prefix + middle + suffix == text
        p, m, s = fim_split(text, u_a, u_b)
        assert suffix == s and (mode == SPM or (prefix, middle) == (p, m))
        modes.append(mode)
    assert set(modes) == {PSM, SPM}
    fim = load_manifest(out).fim
    assert fim["documents_psm"] == modes.count(PSM) and fim["documents_spm"] == modes.count(SPM)
    assert fim["token_ids"] == {"fim_pre": PRE, "fim_mid": MID, "fim_suf": SUF}


def test_fim_rate_and_spm_share_are_as_configured(tmp_path: Path, hf_cache: str, tok: LFM2Tokenizer) -> None:
    n, rate, spm_rate = 2000, 0.5, 0.3
    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(n)]
    src = write_jsonl(tmp_path / "code.jsonl", [{"text": t} for t in docs])
    sources = [{"name": "code", "path": str(src), "weight": 1.0, "code": True}]
    out = tmp_path / "ds"
    job(out, hf_cache, sources, fim={"rate": rate, "spm_rate": spm_rate}, shard_tokens=1 << 20)
    reader = ShardReader(out)
    fimmed = spm = 0
    for i, text in enumerate(docs):
        doc = reader.document(i)
        if doc[0] != PRE:  # plain documents are untouched
            assert tok.decode(doc[:-1]) == text
            continue
        mode = draws(i, rate, spm_rate)[0]
        assert "".join(parse_fim(doc, tok, mode)) == text
        fimmed, spm = fimmed + 1, spm + (mode == SPM)
    assert abs(fimmed - n * rate) < 4 * math.sqrt(n * rate * (1 - rate))  # 4 sigma: ±89 around 1000
    assert abs(spm - fimmed * spm_rate) < 4 * math.sqrt(fimmed * spm_rate * (1 - spm_rate))
    fim = load_manifest(out).fim
    assert (fim["documents_psm"] + fim["documents_spm"], fim["documents_spm"]) == (fimmed, spm)
    # another seed FIMs other documents
    again = tmp_path / "seed1"
    job(again, hf_cache, sources, fim={"rate": rate, "spm_rate": spm_rate}, shard_tokens=1 << 20, seed=1)
    other = ShardReader(again)
    flips = sum((other.document(i)[0] == PRE) != (reader.document(i)[0] == PRE) for i in range(n))
    assert flips > n // 4


def test_fim_only_touches_code_sources(tmp_path: Path, hf_cache: str, corpus: dict[str, Path]) -> None:
    out = tmp_path / "ds"
    job(out, hf_cache, mixed(corpus), fim={"rate": 1.0})
    manifest = load_manifest(out)
    by_name = {s["name"]: s for s in manifest.sources}
    assert by_name["prose"]["fim_psm"] == by_name["prose"]["fim_spm"] == 0
    assert by_name["code"]["fim_psm"] + by_name["code"]["fim_spm"] == by_name["code"]["documents"]
    assert manifest.fim["sources"] == ["code"]


# ------------------------------------------------------------------------------------ determinism, resume
def test_one_and_two_workers_write_identical_bytes(tmp_path: Path, hf_cache: str, corpus: dict[str, Path]) -> None:
    kw = {"fim": {"rate": 0.5}, "total_tokens": 60_000}
    job(tmp_path / "w1", hf_cache, mixed(corpus), num_workers=1, batch_size=64, **kw)
    job(tmp_path / "w2", hf_cache, mixed(corpus), num_workers=2, batch_size=17, **kw)
    a, b = dir_bytes(tmp_path / "w1"), dir_bytes(tmp_path / "w2")
    assert len(a) > 10 and a == b


def test_batch_size_does_not_change_the_output(tmp_path: Path, hf_cache: str, corpus: dict[str, Path]) -> None:
    """The in-process twin of the worker test: how documents are grouped into tasks must not matter."""
    kw = {"fim": {"rate": 0.5}, "total_tokens": 60_000}
    job(tmp_path / "b1", hf_cache, mixed(corpus), batch_size=7, **kw)
    job(tmp_path / "b2", hf_cache, mixed(corpus), batch_size=500, **kw)
    assert dir_bytes(tmp_path / "b1") == dir_bytes(tmp_path / "b2")


def test_resume_after_stop_is_byte_identical(tmp_path: Path, hf_cache: str, corpus: dict[str, Path]) -> None:
    kw = {"fim": {"rate": 0.5}, "total_tokens": 60_000}
    job(tmp_path / "full", hf_cache, mixed(corpus), **kw)
    part = tmp_path / "part"
    first = job(part, hf_cache, mixed(corpus), stop_after_shards=3, **kw)
    assert first["status"] == "stopped" and first["shards"] == 3
    assert not (part / "manifest.json").exists() and (part / STATE_FILE).exists()
    with pytest.raises(DataFormatError, match="did not finish"):
        load_manifest(part)
    second = job(part, hf_cache, mixed(corpus), stop_after_shards=2, **kw)  # resume, stop again
    assert second["status"] == "stopped" and second["shards"] == 5
    third = job(part, hf_cache, mixed(corpus), **kw)
    assert third["status"] == "complete" and third["new_tokens"] < third["tokens"]
    assert dir_bytes(part) == dir_bytes(tmp_path / "full")


def test_resume_after_a_crash_mid_shard_discards_the_partial_shard(tmp_path: Path, hf_cache: str,
                                                                     corpus: dict[str, Path],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {"fim": {"rate": 0.5}, "total_tokens": 60_000}
    job(tmp_path / "full", hf_cache, mixed(corpus), **kw)
    calls = {"n": 0}

    def crashing_write_shard(directory: Path, name: str, tokens: np.ndarray, offsets: np.ndarray):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th shard dies half-written: .bin on disk, no .idx, no checkpoint
            (Path(directory) / f"{name}.bin").write_bytes(tokens.tobytes()[: len(tokens)])
            (Path(directory) / f".{name}.idx.tmp").write_bytes(b"\0" * 8)
            raise KeyboardInterrupt("simulated kill")
        return write_shard(directory, name, tokens, offsets)

    part = tmp_path / "part"
    monkeypatch.setattr(tokenize_mod, "write_shard", crashing_write_shard)
    with pytest.raises(KeyboardInterrupt):
        job(part, hf_cache, mixed(corpus), **kw)
    monkeypatch.undo()
    assert (part / "shard-00003.bin").exists() and not (part / "manifest.json").exists()
    state = json.loads((part / STATE_FILE).read_text())
    assert len(state["shards"]) == 3
    # a checkpointed shard that was modified afterwards is redone too
    bin1 = part / "shard-00002.bin"
    bin1.write_bytes(b"\x01\x00" + bin1.read_bytes()[2:])
    summary = job(part, hf_cache, mixed(corpus), **kw)
    assert summary["status"] == "complete"
    assert dir_bytes(part) == dir_bytes(tmp_path / "full")


def test_finished_dataset_is_kept_refused_or_overwritten(tmp_path: Path, hf_cache: str,
                                                         corpus: dict[str, Path]) -> None:
    out = tmp_path / "ds"
    job(out, hf_cache, mixed(corpus), total_tokens=20_000)
    before = dir_bytes(out)
    assert job(out, hf_cache, mixed(corpus), total_tokens=20_000, num_workers=1)["status"] == "already_complete"
    with pytest.raises(TokenizeError, match="different config"):
        job(out, hf_cache, mixed(corpus), total_tokens=30_000)
    assert dir_bytes(out) == before  # the refusal touched nothing
    (out / "notes.txt").write_text("not ours")
    summary = job(out, hf_cache, mixed(corpus), total_tokens=30_000, overwrite=True)
    assert summary["status"] == "complete" and load_manifest(out).num_tokens >= 30_000
    assert (out / "notes.txt").read_text() == "not ours"  # overwrite only deletes the job's own files


def test_unfinished_job_of_another_config_is_refused_changed_inputs_restart(tmp_path: Path, hf_cache: str,
                                                                            corpus: dict[str, Path]) -> None:
    out = tmp_path / "ds"
    local = tmp_path / "prose.jsonl"
    local.write_bytes(corpus["prose"].read_bytes())
    sources = [{"name": "prose", "path": str(local), "weight": 1.0}]
    job(out, hf_cache, sources, stop_after_shards=1)
    with pytest.raises(TokenizeError, match="unfinished job"):
        job(out, hf_cache, sources, seed=5)
    os.utime(local, ns=(1, 1))  # the input changed under the interrupted job: start over, do not mix
    summary = job(out, hf_cache, sources)
    assert summary["status"] == "complete" and summary["new_tokens"] == summary["tokens"]
    with local.open("a") as f:  # a finished dataset made from other inputs is refused
        f.write(json.dumps({"text": "one more document"}) + "\n")
    with pytest.raises(TokenizeError, match="different config or inputs"):
        job(out, hf_cache, sources)


def test_verify_shards_detects_a_modified_shard(tmp_path: Path, hf_cache: str, corpus: dict[str, Path]) -> None:
    out = tmp_path / "ds"
    job(out, hf_cache, mixed(corpus), total_tokens=20_000)
    verify_shards(out)
    shard = out / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataFormatError, match="shard-00001.bin"):
        verify_shards(out)
    with pytest.raises(TokenizeError, match="shard-00001.bin"):  # rerunning the job notices it too
        job(out, hf_cache, mixed(corpus), total_tokens=20_000)


def test_hydra_config_composes_and_runs(tmp_path: Path, hf_cache: str, corpus: dict[str, Path]) -> None:
    from hydra import compose, initialize
    from hydra.errors import ConfigCompositionException

    tokenize_mod.register_configs()
    src = f"{{name: prose, path: '{corpus['prose']}', weight: 1}}"
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="tokenize", overrides=[f"sources=[{src}]", f"output_dir={tmp_path / 'ds'}",
                                                         f"cache_dir={hf_cache}", "progress=false", "fim.rate=0"])
        default = compose(config_name="tokenize")
        with pytest.raises(ConfigCompositionException):
            compose(config_name="tokenize", overrides=["shard_tokenz=5"])
    assert cfg.sources[0].text_field == "text" and cfg.sources[0].code is False  # defaults filled in
    assert run(cfg)["documents"] == 119
    assert [s.name for s in default.sources] == ["arithmetic", "structured", "code", "prose"]  # bundled corpus
