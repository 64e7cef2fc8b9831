"""GGUF export read back with `gguf.GGUFReader`: every tensor's name, shape, type and (dequantised) value
against the HF weights for every export dtype, dense and MoE; the metadata llama.cpp's LFM2 loaders read;
the tokenizer; refusals. Expected names come from gguf's own `TensorNameMap` (what llama.cpp's converter
uses), not from the exporter's table, so the two are checked against each other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lfm2_train.export import GGUFExportError, export_gguf, gguf_dtypes
from lfm2_train.export.gguf import detect_pre_tokenizer
from lfm2_train.model.hf_io import read_config
from lfm2_train.model.lfm2 import read_state_dict

from .conftest import write_model_dir

QT = gguf.GGMLQuantizationType
# Worst-case |dequantised - original| per element: (relative to the element, relative to its block's max |x|).
# Block formats round to a grid of step d (q8_0: amax/127, q5_1: range/31, q4_1: range/15, q5_0/q4_0: amax/16,
# amax/8, with the far end clipped by one step) and store d in f16.
TOLERANCE = {
    QT.F32: (0.0, 0.0), QT.F16: (2.0**-11, 0.0), QT.BF16: (2.0**-8, 0.0),
    QT.Q8_0: (0.0, 1 / 127), QT.Q5_1: (0.0, 1 / 30), QT.Q4_1: (0.0, 1 / 14),
    QT.Q5_0: (0.0, 1 / 15), QT.Q4_0: (0.0, 1 / 7.5),
}
WANTED = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q5_1": QT.Q5_1, "q5_0": QT.Q5_0,
          "q4_1": QT.Q4_1, "q4_0": QT.Q4_0}


def expected_tensors(src: Path) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, derived the way llama.cpp's converter derives them."""
    config = read_config(src)
    arch = gguf.MODEL_ARCH.LFM2MOE if config.is_moe else gguf.MODEL_ARCH.LFM2
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out = {}
    for key, tensor in read_state_dict(src, config).items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.float()
        if key.endswith("conv.conv.weight"):
            data = data.squeeze(1)  # the converter's `modify_tensors`
        if ".feed_forward.experts." in key:  # the converter's name for the stacked experts
            key = key.removeprefix("model.") + ".weight"
        if key.endswith(".expert_bias"):
            key += ".bias"
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"gguf's TensorNameMap has no name for {key}"
        out[name] = data.numpy()
    return out


def expected_type(name: str, shape: tuple[int, ...], dtype: str) -> QT:
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".shortconv.conv." in name or ".ffn_gate_inp." in name:
        return QT.F32
    return WANTED[dtype]


def dequantised(tensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)


def check_close(name: str, got: np.ndarray, want: np.ndarray, qtype: QT) -> None:
    rel_elem, rel_block = TOLERANCE[qtype]
    bound = rel_elem * np.abs(want) + 1e-7
    if rel_block:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        amax = np.abs(want.reshape(-1, block)).max(axis=1, keepdims=True)
        bound = bound + np.broadcast_to(rel_block * amax, (amax.shape[0], block)).reshape(want.shape)
    err = np.abs(got - want)
    worst = float((err - bound).max())
    assert worst <= 0, f"{name} ({qtype.name}): error exceeds the {qtype.name} bound by {worst:.3g}"
    if qtype != QT.F32:  # a real rounding, not a copy of something else of the same shape
        assert float(err.mean()) < 0.25 * float(np.abs(want).mean()), name


@pytest.mark.parametrize("dtype", gguf_dtypes())
def test_every_tensor_round_trips(model_dir, dtype, tmp_path):
    summary = export_gguf(model_dir, tmp_path / "m.gguf", dtype)
    want = expected_tensors(model_dir)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(want)
    assert summary["f16_fallback"] == []
    for name, value in want.items():
        tensor = got[name]
        assert tuple(int(n) for n in tensor.shape) == tuple(reversed(value.shape)), name  # ggml order
        assert tensor.tensor_type == expected_type(name, value.shape, dtype), name
        check_close(name, dequantised(tensor), value, tensor.tensor_type)
    assert summary["bytes"] == (tmp_path / "m.gguf").stat().st_size
    assert not (tmp_path / "m.gguf.tmp").exists()


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"missing GGUF key {key}"
    return f.contents()


def test_metadata_llama_cpp_reads(model_dir, tmp_path):
    export_gguf(model_dir, tmp_path / "m.gguf", "q8_0")
    config = read_config(model_dir)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = "lfm2moe" if config.is_moe else "lfm2"
    state = read_state_dict(model_dir, config)
    ff = state["model.layers.0.feed_forward.w1.weight"].shape[0]
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert field(reader, "general.name") == model_dir.name
    want = {
        "block_count": config.num_hidden_layers, "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size, "feed_forward_length": ff,
        "attention.head_count": config.num_attention_heads, "vocab_size": config.vocab_size,
        "shortconv.l_cache": config.conv_L_cache,
        "attention.head_count_kv": [0, config.num_key_value_heads, 0, config.num_key_value_heads],
    }
    if config.is_moe:
        want |= {"expert_count": config.num_experts, "expert_used_count": config.num_experts_per_tok,
                 "expert_feed_forward_length": config.moe_intermediate_size,
                 "leading_dense_block_count": config.num_dense_layers,
                 "expert_gating_func": int(gguf.ExpertGatingFuncType.SIGMOID)}
    for key, value in want.items():
        assert field(reader, f"{arch}.{key}") == value, key
    assert field(reader, f"{arch}.rope.freq_base") == pytest.approx(config.rope_theta)
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config.norm_eps)


def test_tokenizer_is_embedded(dense_dir, tmp_path):
    export_gguf(dense_dir, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    spec = json.loads((dense_dir / "tokenizer.json").read_text())
    tok_config = json.loads((dense_dir / "tokenizer_config.json").read_text())
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == read_config(dense_dir).vocab_size
    for token, i in spec["model"]["vocab"].items():
        assert tokens[i] == token
    for added in spec["added_tokens"]:
        assert tokens[added["id"]] == added["content"] and types[added["id"]] == int(gguf.TokenType.CONTROL)
    assert types[100] == int(gguf.TokenType.NORMAL)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.padding_token_id")) == (1, 7, 0)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.chat_template") == tok_config["chat_template"]


def test_untied_head_and_f16_fallback(tmp_path):
    # rows of 48 do not split into 32-wide blocks: the converter (and we) write those weights as f16
    src = write_model_dir(tmp_path / "odd", tie_word_embeddings=False, intermediate_size=48,
                          block_auto_adjust_ff_dim=False)
    summary = export_gguf(src, tmp_path / "m.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {t.name: t for t in reader.tensors}
    want = expected_tensors(src)
    assert "output.weight" in got and sorted(got) == sorted(want)
    assert sorted(summary["f16_fallback"]) == sorted(f"blk.{i}.ffn_down.weight" for i in range(4))
    for name, value in want.items():
        qtype = QT.F16 if name in summary["f16_fallback"] else expected_type(name, value.shape, "q8_0")
        assert got[name].tensor_type == qtype, name
        check_close(name, dequantised(got[name]), value, qtype)


@pytest.mark.parametrize("tied", [True, False])
def test_output_tensor_takes_its_own_dtype(tmp_path, tied):
    """q4_0 body, q8_0 output projection (llama-quantize's convention above 4 bits): only the tensor llama.cpp
    multiplies the hidden states by changes type -- `output.weight`, or `token_embd.weight` when tied."""
    src = write_model_dir(tmp_path / "src", tie_word_embeddings=tied)
    summary = export_gguf(src, tmp_path / "m.gguf", "q4_0", output_dtype="q8_0")
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    out = "token_embd.weight" if tied else "output.weight"
    assert summary["output_dtype"] == "q8_0" and summary["dtype"] == "q4_0"
    want = expected_tensors(src)
    for name, value in want.items():
        qtype = expected_type(name, value.shape, "q8_0" if name == out else "q4_0")
        assert got[name].tensor_type == qtype, name
        check_close(name, dequantised(got[name]), value, qtype)
    if not tied:
        assert got["token_embd.weight"].tensor_type == QT.Q4_0  # the input table stays in the body's type
    with pytest.raises(GGUFExportError, match="output dtype 'q6_k'"):
        export_gguf(src, tmp_path / "x.gguf", "q4_0", output_dtype="q6_k")


def test_moe_without_expert_bias_gets_zero_bias(tmp_path):
    src = write_model_dir(tmp_path / "nobias", preset="tiny_moe", use_expert_bias=False)
    export_gguf(src, tmp_path / "m.gguf", "f32")
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    for i in range(1, 4):  # llama.cpp requires the bias on every MoE layer; zeros select like no bias
        assert np.array_equal(got[f"blk.{i}.exp_probs_b.bias"].data, np.zeros(4, np.float32))


def test_refusals(dense_dir, tmp_path):
    with pytest.raises(GGUFExportError, match="q4_k"):
        export_gguf(dense_dir, tmp_path / "m.gguf", "q4_k")
    with pytest.raises(GGUFExportError, match="conv_bias"):
        export_gguf(write_model_dir(tmp_path / "bias", conv_bias=True), tmp_path / "m.gguf", "f32")
    with pytest.raises(GGUFExportError, match="routed_scaling_factor"):
        export_gguf(write_model_dir(tmp_path / "scaled", preset="tiny_moe", routed_scaling_factor=2.0),
                    tmp_path / "m.gguf", "f32")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(dense_dir / f, bare / f)
    with pytest.raises(GGUFExportError, match="no tokenizer.json"):
        export_gguf(bare, tmp_path / "m.gguf", "f32")
    summary = export_gguf(bare, tmp_path / "m.gguf", "f32", tokenizer=dense_dir)  # the tokenizer from elsewhere
    assert summary["pre_tokenizer"] == "gpt-2"
    assert not (tmp_path / "m.gguf.tmp").exists()


def test_pre_tokenizer_detection_refuses_unknown_and_takes_an_override(dense_dir, tmp_path):
    other = tmp_path / "tok"
    other.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dense_dir / f, other / f)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFKC"}  # llama.cpp's gpt-2 pre-tokenizer would not normalise
    (other / "tokenizer.json").write_text(json.dumps(spec))
    assert detect_pre_tokenizer(dense_dir) == "gpt-2"
    with pytest.raises(GGUFExportError, match="pre-tokenizer"):
        detect_pre_tokenizer(other)
    export_gguf(dense_dir, tmp_path / "m.gguf", "f32", tokenizer=other, pre_tokenizer="llama-bpe")
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "tokenizer.ggml.pre") == "llama-bpe"


def test_bf16_source_exports_like_f32_source(dense_dir, tmp_path):
    from lfm2_train.model import LFM2ForCausalLM

    half = tmp_path / "bf16"
    LFM2ForCausalLM.from_pretrained(dense_dir).save_pretrained(half, dtype=torch.bfloat16)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(dense_dir / f, half / f)
    export_gguf(half, tmp_path / "m.gguf", "bf16")
    got = {t.name: t for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    for name, value in expected_tensors(half).items():  # bf16 -> bf16 is exact
        assert np.array_equal(dequantised(got[name]), value), name
