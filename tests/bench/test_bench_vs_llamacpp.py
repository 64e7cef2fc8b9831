"""bench/bench_vs_llamacpp.py: a skip (exit 0, how to install) without llama.cpp; end to end with it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", ROOT / "bench" / "bench_vs_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_without_llama_cpp_it_says_how_to_install_and_exits_0(capsys, monkeypatch, tmp_path):
    module = _module()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError

    def no_bench(*_args):
        raise AssertionError("the benchmark must not start without llama.cpp")

    monkeypatch.setattr(module, "bench", no_bench)
    out_file = tmp_path / "out.json"
    assert module.main(["--quick", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "llama-cpp-python is not installed" in out and 'pip install -e ".[deploy]"' in out
    assert not out_file.exists()


def test_prefix_agreement_counts_up_to_the_first_difference():
    agree = _module().prefix_agree
    assert agree([1, 2, 3, 4], [1, 2, 9, 4], 4) == 2
    assert agree([1, 2, 3, 4], [1, 2, 3, 4], 3) == 3
    assert agree([5], [6], 1) == 0


def test_a_quant_mode_the_fast_path_lacks_is_unavailable_not_an_error(monkeypatch):
    module = _module()
    assert module.fast_kwargs("q4_0-pure") == {"dtype": module.torch.float32, "quant": "q4_0", "head_quant": "q4_0"}
    assert module.MODES["q4_0"].file_key == "q4_0+q8_0-output" and module.MODES["q4_0-pure"].file_key == "q4_0"

    def old_from_model(model, *, dtype=None, int8=False, prefill_chunk=512, kernels="auto"):
        raise AssertionError("not called")

    monkeypatch.setattr(module.FastLFM2, "from_model", old_from_model)
    assert module.fast_kwargs("int8") == {"dtype": module.torch.float32, "int8": True}
    with pytest.raises(module.Unavailable, match="no quant= parameter"):
        module.fast_kwargs("q4_0")

    def new_from_model(model, *, dtype=None, quant=None, kernels="auto"):
        if quant not in (None, "int8"):
            raise ValueError(f"unknown quant {quant!r}")
        return "fast"

    monkeypatch.setattr(module.FastLFM2, "from_model", new_from_model)
    assert module.fast_kwargs("w8a8") == {"dtype": module.torch.float32, "quant": "w8a8"}
    with pytest.raises(module.Unavailable, match="no head_quant= parameter"):
        module.fast_kwargs("q4_0-pure")
    assert module.build_fast(None, "int8", "auto") == "fast"
    with pytest.raises(module.Unavailable, match="unknown quant 'w8a8'"):
        module.build_fast(None, "w8a8", "auto")


@pytest.mark.slow
def test_quick_run_end_to_end_against_llama_cpp(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    module = _module()
    out_file = tmp_path / "quick.json"
    assert module.main(["--quick", "--threads", "1", "--out", str(out_file)]) == 0
    result = json.loads(out_file.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert {"f32", "int8"} <= set(rows)  # every fast path has these; w8a8 / q4_0 only where it offers them
    assert {"bf16", "f16"} & set(rows)
    assert set(rows) | set(result["not_available"]) >= {"int8", "w8a8", "q4_0"}
    for row in rows.values():
        assert row["prompt"] == 64 and row["decode_steps"] == 8
        assert row["ours_decode_tok_s"] > 0 and row["theirs_decode_tok_s"] > 0
        assert len(row["ours_tokens"]) == len(row["theirs_tokens"]) == 9
        assert 0 <= row["greedy_agree"] <= 8
    assert rows["f32"]["ours_vs_our_fp32"] == 8  # the f32 mode is its own reference
    # f32 in both engines on the same file: the same greedy tokens (f16 KV cache or not, at this size)
    assert rows["f32"]["greedy_agree"] == 8
    assert result["machine"]["threads"] == 1 and "avx2" in result["machine"]["cpu_flags"]
    assert set(result["gguf_files"]) >= {"f32", "q8_0"}
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # every row, "not available" ones too, has 10 cells
