"""stage=cache_teacher end to end on tiny teachers: values vs a direct forward, windows, uint32 ids, exact
resume, a transformers teacher, and every refusal (before any work, with a message naming the problem)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.data import teacher_cache_writer
from lfm2_train.data.document_windows import document_windows
from lfm2_train.data.format import DataFormatError, Manifest, ShardReader, load_manifest
from lfm2_train.data.teacher_cache import CACHE_MANIFEST, TeacherCache, decode_logprobs, write_cache_shard
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import cache_teacher, run_stage
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

K = 32
FAST = ["stage.progress_bar=false", "stage.max_length=128", "stage.block_documents=16",
        "stage.max_tokens_per_batch=512"]


def _cfg(out: Path, data: Path, teacher: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[
            "stage=cache_teacher", f"stage.teacher={teacher}", f"data.path={data}", f"output_dir={out}",
            *FAST, *overrides])


def _save_teacher(path: Path, seed: int = 0, **changes) -> Path:
    """A tiny random LFM2 checkpoint with the datasets' tokenizer beside it, as a real teacher directory."""
    torch.manual_seed(seed)
    LFM2ForCausalLM(get_preset("tiny").replace(**changes)).save_pretrained(path)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(path)
    return path


@pytest.fixture
def data(tmp_path, make_dataset, make_texts) -> Path:
    """~4.5k tokens in 4 shards (of 160 documents): several shards and blocks, yet a second per pass."""
    return make_dataset(tmp_path / "data", make_texts(160), shard_tokens=1200)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _save_teacher(tmp_path_factory.mktemp("ct_teacher"))


def _files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.is_file()}


def _assert_matches(cache: TeacherCache, reader: ShardReader, logits_of, rtol: float) -> None:
    """The cache holds a correct top-K of the reference logits, with log-probs within the storage rounding.

    Packed forwards (doc_ids masks) and a single-document forward round differently (~2e-7 in fp32), so
    two near-tied logits may swap places; the cached ids must then still carry the reference top-K values.
    """
    exact = total = 0
    for d in range(len(reader)):
        start, n = reader.token_start(d), len(reader.document(d))
        logits = logits_of(d).float()  # (n, V)
        ref_vals, ref_ids = torch.topk(logits, cache.k)
        ids, lp = cache.gather(torch.arange(start, start + n))
        torch.testing.assert_close(logits.gather(1, ids), ref_vals, rtol=0, atol=1e-5)
        ref_lp = torch.log_softmax(logits, dim=-1).gather(1, ids)
        torch.testing.assert_close(lp, ref_lp, rtol=rtol, atol=1e-6)
        exact += int((ids == ref_ids).all(1).sum())
        total += n
    assert exact >= 0.99 * total, f"only {exact}/{total} rows have exactly the reference top-K order"


def test_cache_equals_direct_forward_and_reads_back(tmp_path, data, teacher):
    summary = run_stage(_cfg(tmp_path, data, teacher))
    out = tmp_path / "teacher_cache"
    assert summary["status"] == "finished" and summary["output"] == str(out)
    manifest = load_manifest(data)
    tok = LFM2Tokenizer.from_pretrained(data / "tokenizer")
    cache = TeacherCache(out, manifest, k=K, vocab_size=512, tokenizer_fingerprint=tok.fingerprint())
    m = cache.manifest
    assert (m.k, m.ids_dtype, m.logprob_dtype, m.vocab_size) == (K, "uint16", "float16", 512)
    assert m.teacher["model_type"] == "lfm2" and m.teacher["path"] == str(teacher.resolve())
    assert m.teacher["num_parameters"] == LFM2ForCausalLM(get_preset("tiny")).num_parameters()
    assert len(m.shards) == len(manifest.shards) > 2 and not (out / ".work").exists()
    assert summary["bytes_per_token"] <= 4 * K + 8
    model = LFM2ForCausalLM.from_pretrained(teacher).eval()
    reader = ShardReader(data, manifest)
    with torch.no_grad():
        _assert_matches(cache, reader, lambda d: model(torch.from_numpy(reader.document(d).astype(np.int64))[None])[0],
                        rtol=2**-11)
    # The streamed shard files are exactly what the format's writer produces from the same arrays.
    name = m.shards[1].name
    ids = np.fromfile(out / f"{name}.ids", dtype=np.uint16).reshape(-1, K)
    words = np.fromfile(out / f"{name}.lp", dtype=np.uint16).reshape(-1, K)
    assert write_cache_shard(tmp_path, name, ids, words) == m.shards[1]
    assert bool((decode_logprobs(words, "float16") <= 0).all())
    # Running again finds the complete cache and does nothing.
    again = run_stage(_cfg(tmp_path, data, teacher))
    assert again["status"] == "complete" and again["computed_tokens"] == 0


def test_windows_of_a_long_document(tmp_path, make_dataset, make_texts, teacher):
    texts = [" ".join(make_texts(30, seed=1)), *make_texts(6, seed=2), " ".join(make_texts(12, seed=3))]
    data = make_dataset(tmp_path / "long", texts)
    reader = ShardReader(data)
    assert max(len(reader.document(d)) for d in range(len(reader))) > 500
    run_stage(_cfg(tmp_path, data, teacher, "stage.max_length=64", "stage.window_overlap=16",
                   "stage.block_documents=3", "stage.max_tokens_per_batch=256", "stage.logprob_dtype=bfloat16"))
    cache = TeacherCache(tmp_path / "teacher_cache", load_manifest(data), k=K)
    assert cache.manifest.logprob_dtype == "bfloat16"
    model = LFM2ForCausalLM.from_pretrained(teacher).eval()

    def windowed(d: int) -> torch.Tensor:
        doc = torch.from_numpy(reader.document(d).astype(np.int64))
        return torch.cat([model(doc[None, s:e])[0, emit - s:] for s, emit, e in document_windows(len(doc), 64, 16)])

    with torch.no_grad():
        _assert_matches(cache, reader, windowed, rtol=2**-8)


def test_vocab_above_65536_stores_uint32_ids(tmp_path, make_dataset, make_texts):
    data = make_dataset(tmp_path / "big", make_texts(24))
    manifest = load_manifest(data).to_dict()
    manifest["vocab_size"] = 70000  # the same token ids, declared against a 70k vocabulary
    Manifest.from_dict(manifest).save(data)
    teacher = _save_teacher(tmp_path / "t70k", vocab_size=70000)
    run_stage(_cfg(tmp_path, data, teacher))
    cache = TeacherCache(tmp_path / "teacher_cache", load_manifest(data), k=K, vocab_size=70000)
    assert cache.manifest.ids_dtype == "uint32"
    shard = cache.manifest.shards[0]
    assert (tmp_path / "teacher_cache" / f"{shard.name}.ids").stat().st_size == shard.tokens * K * 4
    reader = ShardReader(data)
    model = LFM2ForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        _assert_matches(cache, reader, lambda d: model(torch.from_numpy(reader.document(d).astype(np.int64))[None])[0],
                        rtol=2**-11)
    ids, _ = cache.gather(torch.arange(load_manifest(data).num_tokens))
    assert int(ids.max()) > 65535  # ids above uint16 survive


def test_interrupted_and_crashed_runs_resume_byte_identical(tmp_path, data, teacher, monkeypatch):
    full = run_stage(_cfg(tmp_path / "full", data, teacher))
    part = tmp_path / "part"
    stopped = run_stage(_cfg(part, data, teacher, "stage.stop_after_blocks=3"))
    assert stopped["status"] == "interrupted" and not (part / "teacher_cache" / CACHE_MANIFEST).exists()
    # Crash between appending a block's rows and recording them: the rows must be dropped on resume.
    calls = {"n": 0}
    real = teacher_cache_writer._write_progress

    def crash_on_third(path, progress):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        real(path, progress)

    monkeypatch.setattr(teacher_cache_writer, "_write_progress", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(_cfg(part, data, teacher))
    monkeypatch.setattr(teacher_cache_writer, "_write_progress", real)
    resumed = run_stage(_cfg(part, data, teacher))
    assert resumed["status"] == "finished"
    assert 0 < resumed["computed_tokens"] < full["computed_tokens"]  # finished shards and blocks were kept
    assert _files(part / "teacher_cache") == _files(tmp_path / "full" / "teacher_cache")


def test_ranks_take_disjoint_shards_and_rank0_writes_the_manifest(tmp_path, data, teacher, monkeypatch):
    from lfm2_train.engine.distributed import Runtime

    run_stage(_cfg(tmp_path / "single", data, teacher))
    seen = []

    def fake_runtime(rank: int):
        runtime = Runtime(rank=rank, world_size=2)
        runtime.barrier = lambda: None  # one process plays both ranks, one after the other
        return lambda _cfg: (seen.append(rank), runtime)[1]

    monkeypatch.setattr(cache_teacher.Runtime, "from_env", fake_runtime(1))
    rank1 = run_stage(_cfg(tmp_path / "two", data, teacher))
    n = len(load_manifest(data).shards)
    odd = sum(s.tokens for i, s in enumerate(load_manifest(data).shards) if i % 2 == 1)
    assert rank1["status"] == "finished" and rank1["computed_tokens"] == odd
    assert not (tmp_path / "two" / "teacher_cache" / CACHE_MANIFEST).exists()
    assert sorted(f.name for f in (tmp_path / "two" / "teacher_cache").glob("topk-*.ids")) == \
        [f"topk-{i:05d}.ids" for i in range(1, n, 2)]
    monkeypatch.setattr(cache_teacher.Runtime, "from_env", fake_runtime(0))
    run_stage(_cfg(tmp_path / "two", data, teacher))
    assert seen == [1, 0]
    assert _files(tmp_path / "two" / "teacher_cache") == _files(tmp_path / "single" / "teacher_cache")


def test_rank0_stops_waiting_for_a_rank_that_never_finishes(tmp_path, data, teacher, monkeypatch):
    from lfm2_train.engine.barrier import BarrierTimeout
    from lfm2_train.engine.distributed import Runtime

    runtime = Runtime(rank=0, world_size=2)
    runtime.barrier = lambda: None  # rank 1 never runs
    monkeypatch.setattr(cache_teacher.Runtime, "from_env", lambda _cfg: runtime)
    with pytest.raises(BarrierTimeout, match=r"rank 1 to write .*topk-00001\.done\.json.*timeout of 0\.5 s"):
        run_stage(_cfg(tmp_path, data, teacher, "stage.wait_timeout_s=0.5"))
    assert (tmp_path / "teacher_cache" / "topk-00000.ids").is_file()  # its own shards are kept for the rerun
    assert not (tmp_path / "teacher_cache" / CACHE_MANIFEST).exists()


def test_transformers_teacher(tmp_path, data):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    for f in (data / "tokenizer").iterdir():
        shutil.copy(f, tmp_path / "llama" / f.name)
    run_stage(_cfg(tmp_path, data, tmp_path / "llama"))
    cache = TeacherCache(tmp_path / "teacher_cache", load_manifest(data), k=K)
    assert cache.manifest.teacher["model_type"] == "llama"
    assert cache.manifest.teacher["format"] == "transformers"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama").eval()
    reader = ShardReader(data)
    with torch.no_grad():
        _assert_matches(cache, reader,
                        lambda d: model(torch.from_numpy(reader.document(d).astype(np.int64))[None]).logits[0],
                        rtol=2**-11)
    # max_length beyond the teacher's positions is refused before anything runs.
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        run_stage(_cfg(tmp_path / "x", data, tmp_path / "llama", "stage.max_length=512"))


def test_refusals_before_any_work(tmp_path, data, teacher, make_dataset, make_texts):
    out = tmp_path / "x"
    # A teacher whose tokenizer maps text to other ids.
    other_tok = tmp_path / "other_tok"
    shutil.copytree(teacher, other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    tok["model"]["merges"] = tok["model"]["merges"][:-1]
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DataFormatError, match=f"teacher {other_tok}.*{data / 'tokenizer'}.*differ"):
        run_stage(_cfg(out, data, other_tok))
    # A teacher with another vocabulary size.
    wide = _save_teacher(tmp_path / "wide", vocab_size=640)
    with pytest.raises(DataFormatError, match="vocab_size 640.*512"):
        run_stage(_cfg(out, data, wide))
    with pytest.raises(ValueError, match="stage.teacher"):
        run_stage(_cfg(out, data, teacher, "stage.teacher=null"))
    assert not (out / "teacher_cache").exists()

    run_stage(_cfg(out, data, teacher))
    cache_dir = out / "teacher_cache"
    # Reading the cache against other shards, or with another K than the run is configured for.
    changed = make_dataset(tmp_path / "changed", make_texts(160)[:-1] + ["a different last document"],
                           shard_tokens=1200)
    with pytest.raises(DataFormatError, match="computed on other shards"):
        TeacherCache(cache_dir, load_manifest(changed))
    with pytest.raises(DataFormatError, match="holds K=32, the run is configured for K=16"):
        TeacherCache(cache_dir, load_manifest(data), k=16)
    # Rewriting a complete cache with another K or teacher needs stage.overwrite=true.
    before = _files(cache_dir)
    with pytest.raises(DataFormatError, match="another teacher/dataset/K.*k: cached 32, now 16.*overwrite=true"):
        run_stage(_cfg(out, data, teacher, "stage.k=16"))
    other = _save_teacher(tmp_path / "other", seed=1)
    with pytest.raises(DataFormatError, match="weights_sha256.*overwrite=true"):
        run_stage(_cfg(out, data, other))
    assert _files(cache_dir) == before
    assert run_stage(_cfg(out, data, teacher, "stage.k=16", "stage.overwrite=true"))["status"] == "finished"
    assert TeacherCache(cache_dir, load_manifest(data), k=16).k == 16
    # A truncated cache file.
    ids_file = cache_dir / "topk-00001.ids"
    ids_file.write_bytes(ids_file.read_bytes()[:-2])
    with pytest.raises(DataFormatError, match="topk-00001.ids is truncated"):
        TeacherCache(cache_dir, load_manifest(data), k=16)
