"""GGUF export: a Hugging Face LFM2 / LFM2-MoE directory as one GGUF file that llama.cpp runs.

LFM2 is deployed mostly through llama.cpp, which reads GGUF. The file is written with the `gguf` package
that llama.cpp publishes (its writer, its quantisers, its name and key constants), and laid out the way
llama.cpp's own converter (`convert_hf_to_gguf.py`, classes `LFM2Model` / `LFM2MoeModel`) lays it out, so
that llama.cpp's `lfm2` / `lfm2moe` loaders accept it unchanged:

- architecture `lfm2` (dense) or `lfm2moe`; per-layer `attention.head_count_kv` is the KV head count on
  attention layers and 0 on short-conv layers (that is how llama.cpp tells the two apart);
  `shortconv.l_cache` is the conv kernel size; `feed_forward_length` is the SwiGLU width actually built
  (after `block_auto_adjust_ff_dim`), read from the weights; MoE adds expert counts, the expert width,
  the leading dense block count and sigmoid gating.
- tensors are named from `gguf.TENSOR_NAMES`; the final RMSNorm (`model.embedding_norm`) is
  `token_embd_norm`, as llama.cpp expects; the depthwise conv kernel (d, 1, k) is squeezed to (d, k)
  (ggml order {k, d}); MoE experts are stacked per layer into (E, out, in) tensors; the routing bias is
  `exp_probs_b.bias`. A tied LM head is not written (llama.cpp reuses `token_embd`).
- types: 1-D tensors, norms, the conv kernel and the MoE router stay f32 (as in the converter); every
  other weight takes the requested type. A weight whose rows are not a multiple of the quantisation block
  falls back to f16, again as the converter does.
- tokenizer: byte-level BPE tokens, merges, token types, bos / eos / pad ids, add-bos flag and the chat
  template, read from `tokenizer.json` / `tokenizer_config.json` (no `transformers` needed).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import MODEL_TENSOR as T
from gguf import GGMLQuantizationType as QT
from gguf import LlamaFileType as FT

from ..model.config import LFM2Config
from ..model.hf_io import read_config
from ..model.lfm2 import read_state_dict

#: export dtype -> (tensor type of the quantised weights, `general.file_type`). Only types that
#: `gguf.quants` can *write* in Python; the k-quants and i-quants need llama.cpp's `llama-quantize`.
GGUF_DTYPES: dict[str, tuple[Any, Any]] = {
    "f32": (QT.F32, FT.ALL_F32),
    "f16": (QT.F16, FT.MOSTLY_F16),
    "bf16": (QT.BF16, FT.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, FT.MOSTLY_Q8_0),
    "q5_1": (QT.Q5_1, FT.MOSTLY_Q5_1),
    "q5_0": (QT.Q5_0, FT.MOSTLY_Q5_0),
    "q4_1": (QT.Q4_1, FT.MOSTLY_Q4_1),
    "q4_0": (QT.Q4_0, FT.MOSTLY_Q4_0),
}
# HF key (per-layer keys without their `model.layers.{i}.` prefix) -> (gguf tensor, suffix). Everything in
# a checkpoint must be here: an unknown key is an error, never silently dropped.
_GLOBAL = {
    "model.embed_tokens.weight": (T.TOKEN_EMBD, "weight"),
    "model.embedding_norm.weight": (T.TOKEN_EMBD_NORM, "weight"),  # llama.cpp's LFM2 output norm
    "lm_head.weight": (T.OUTPUT, "weight"),  # untied heads only
}
_LAYER = {
    "operator_norm.weight": (T.ATTN_NORM, "weight"),
    "ffn_norm.weight": (T.FFN_NORM, "weight"),
    "conv.in_proj.weight": (T.SHORTCONV_INPROJ, "weight"),
    "conv.conv.weight": (T.SHORTCONV_CONV, "weight"),
    "conv.out_proj.weight": (T.SHORTCONV_OUTPROJ, "weight"),
    "self_attn.q_proj.weight": (T.ATTN_Q, "weight"),
    "self_attn.k_proj.weight": (T.ATTN_K, "weight"),
    "self_attn.v_proj.weight": (T.ATTN_V, "weight"),
    "self_attn.out_proj.weight": (T.ATTN_OUT, "weight"),
    "self_attn.q_layernorm.weight": (T.ATTN_Q_NORM, "weight"),
    "self_attn.k_layernorm.weight": (T.ATTN_K_NORM, "weight"),
    "feed_forward.w1.weight": (T.FFN_GATE, "weight"),
    "feed_forward.w3.weight": (T.FFN_UP, "weight"),
    "feed_forward.w2.weight": (T.FFN_DOWN, "weight"),
    "feed_forward.gate.weight": (T.FFN_GATE_INP, "weight"),
    "feed_forward.experts.w1": (T.FFN_GATE_EXP, "weight"),  # (E, F, d), stacked by read_state_dict
    "feed_forward.experts.w3": (T.FFN_UP_EXP, "weight"),
    "feed_forward.experts.w2": (T.FFN_DOWN_EXP, "weight"),
    "feed_forward.expert_bias": (T.FFN_EXP_PROBS_B, "bias"),
}
# Kept in f32 whatever the file type, as llama.cpp's converter does (ops that need f32 inputs).
_ALWAYS_F32 = (T.SHORTCONV_CONV, T.FFN_GATE_INP)

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# llama.cpp's pre-tokenizer fingerprint (convert_hf_to_gguf.py `get_vocab_base_pre`): the token ids of
# this text, encoded with the model's tokenizer (special tokens added), hashed with sha256.
PRE_TOKENIZER_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# The fingerprints of the released LFM2 tokenizers and of GPT-2's, from the same table.
KNOWN_PRE_TOKENIZERS = {
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",  # LiquidAI/LFM2(.5)-350M ...
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",  # LiquidAI/LFM2.5-8B-A1B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
}


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as a GGUF file llama.cpp would run correctly."""


def gguf_dtypes() -> list[str]:
    """The export dtypes this installation can write."""
    return list(GGUF_DTYPES)


# ---------------------------------------------------------------------------------------------- weights
def gguf_arch(config: LFM2Config) -> str:
    """llama.cpp's architecture name for this model."""
    return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LFM2MOE if config.is_moe else gguf.MODEL_ARCH.LFM2]


def check_supported(config: LFM2Config) -> None:
    """Refuse configurations llama.cpp's LFM2 graph would run differently from ours (wrong outputs, not errors)."""
    if config.conv_bias:
        raise GGUFExportError("conv_bias=true: llama.cpp's LFM2 short-conv block has no biases")
    if config.num_attention_heads * config.head_size != config.hidden_size:
        raise GGUFExportError(f"num_attention_heads * head_dim = {config.num_attention_heads * config.head_size} "
                              f"!= hidden_size {config.hidden_size}: llama.cpp's LFM2 attention output "
                              f"projection is hidden_size x hidden_size")
    if config.is_moe:
        if not config.norm_topk_prob:
            raise GGUFExportError("norm_topk_prob=false: llama.cpp's LFM2-MoE always renormalises the top-k "
                                  "expert weights")
        if config.routed_scaling_factor != 1.0:
            raise GGUFExportError(f"routed_scaling_factor={config.routed_scaling_factor}: llama.cpp's LFM2-MoE "
                                  f"does not read an expert weight scale")


def gguf_tensor_name(hf_key: str, config: LFM2Config) -> str | None:
    """The GGUF name of a checkpoint tensor, or None for a tied LM head (llama.cpp reuses token_embd)."""
    if hf_key == "lm_head.weight" and config.tie_word_embeddings:
        return None
    if hf_key in _GLOBAL:
        kind, suffix = _GLOBAL[hf_key]
        return f"{gguf.TENSOR_NAMES[kind]}.{suffix}"
    m = _LAYER_KEY.match(hf_key)
    if m and m.group(2) in _LAYER:
        kind, suffix = _LAYER[m.group(2)]
        return f"{gguf.TENSOR_NAMES[kind].format(bid=int(m.group(1)))}.{suffix}"
    raise GGUFExportError(f"no GGUF tensor for checkpoint key {hf_key!r} (llama.cpp's LFM2 has no such weight)")


def _tensor_kind(gguf_name: str) -> Any:
    base = gguf_name.rsplit(".", 1)[0]
    for kind, pattern in gguf.TENSOR_NAMES.items():
        if re.fullmatch(re.escape(pattern).replace(r"\{bid\}", r"\d+"), base):
            return kind
    raise GGUFExportError(f"unknown GGUF tensor {gguf_name!r}")  # pragma: no cover - names come from the table


def gguf_tensor_type(gguf_name: str, shape: tuple[int, ...], dtype: str) -> Any:
    """The tensor type a weight gets in a `dtype` file: llama.cpp's converter's rules."""
    qtype = GGUF_DTYPES[dtype][0]
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or _tensor_kind(gguf_name) in _ALWAYS_F32:
        return QT.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return QT.F16  # the converter's fallback when rows do not split into quantisation blocks
    return qtype


def gguf_tensors(state: dict[str, torch.Tensor], config: LFM2Config) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in GGUF's logical layout) for every weight, popping `state` as it goes."""
    for key in list(state):
        tensor = state.pop(key)
        name = gguf_tensor_name(key, config)
        if name is None:
            continue
        data = tensor.detach().to(torch.float32).cpu()
        if key.endswith("conv.conv.weight"):  # (d, 1, k) -> (d, k): ggml_ssm_conv takes a 2-D kernel
            data = data.squeeze(1)
        yield name, data.numpy()
    if config.is_moe and not config.use_expert_bias:  # llama.cpp requires the bias; zeros select the same
        for i in range(config.num_dense_layers, config.num_hidden_layers):
            yield f"{gguf.TENSOR_NAMES[T.FFN_EXP_PROBS_B].format(bid=i)}.bias", np.zeros(config.num_experts,
                                                                                           np.float32)


def is_output_tensor(gguf_name: str, config: LFM2Config) -> bool:
    """Whether llama.cpp multiplies the final hidden states by this tensor: `output.weight`, or `token_embd.weight`
    when the head is tied (llama.cpp then reuses the embedding table as the output)."""
    if gguf_name == f"{gguf.TENSOR_NAMES[T.OUTPUT]}.weight":
        return True
    return gguf_name == f"{gguf.TENSOR_NAMES[T.TOKEN_EMBD]}.weight" and config.tie_word_embeddings


def encode_tensor(name: str, data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """The bytes-or-values array `GGUFWriter.add_tensor` takes, and its tensor type."""
    qtype = gguf_tensor_type(name, data.shape, dtype)
    if qtype == QT.F32:
        return np.ascontiguousarray(data, dtype=np.float32), qtype
    return gguf.quants.quantize(np.ascontiguousarray(data), qtype), qtype


# -------------------------------------------------------------------------------------------- tokenizer
def _tokenizer_dir(source: Path, tokenizer: str | Path | None) -> Path:
    path = Path(tokenizer) if tokenizer is not None else source
    if not (path / "tokenizer.json").is_file():
        raise GGUFExportError(f"{path} has no tokenizer.json; a GGUF file carries its tokenizer: point "
                              f"`tokenizer` at a directory with tokenizer.json / tokenizer_config.json")
    return path


def detect_pre_tokenizer(tokenizer_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`).

    The released LFM2 tokenizers are recognised by llama.cpp's fingerprint (-> "lfm2"). Tokenizers trained
    here (data_pipelines/train_tokenizer.py) have their own vocabularies, so no fingerprint can match; they
    pre-tokenize with GPT-2's byte-level regex and no normaliser, which is llama.cpp's "gpt-2". Anything
    else is refused rather than guessed: a wrong pre-tokenizer silently changes the token ids.
    """
    from tokenizers import Tokenizer

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(PRE_TOKENIZER_CHECK_TEXT).ids
    fingerprint = hashlib.sha256(str(ids).encode()).hexdigest()
    if fingerprint in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[fingerprint]
    pre = spec.get("pre_tokenizer") or {}
    if (pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
            and spec.get("normalizer") is None):
        return "gpt-2"
    raise GGUFExportError(f"cannot tell llama.cpp's pre-tokenizer for {tokenizer_dir}/tokenizer.json "
                          f"(pre_tokenizer {json.dumps(pre)[:200]}); name it with `pre_tokenizer=` "
                          f"(llama.cpp's tokenizer.ggml.pre values, e.g. lfm2, gpt-2, llama-bpe)")


class _DropPairSeparatorWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "TemplateProcessing<pair>" not in record.getMessage()


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def tokenizer_vocab(tokenizer_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings in id order (padded to the model's vocabulary) and their llama.cpp token types."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{tokenizer_dir}/tokenizer.json holds a {model.get('type')!r} model; the GGUF "
                              f"export writes byte-level BPE tokenizers (LFM2's)")
    by_id: dict[int, tuple[str, int]] = {i: (tok, gguf.TokenType.NORMAL) for tok, i in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        special = added.get("special") or _looks_special(added["content"])
        by_id[added["id"]] = (added["content"], gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise GGUFExportError(f"tokenizer id {max(by_id)} is outside the model's vocabulary ({vocab_size})")
    tokens, types = [], []
    for i in range(vocab_size):  # embedding rows the tokenizer never emits, as the converter writes them
        tok, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(tok)
        types.append(int(kind))
    return tokens, types


def _write_tokenizer(writer: Any, tokenizer_dir: Path, vocab_size: int, pre_tokenizer: str | None) -> str:
    tokens, types = tokenizer_vocab(tokenizer_dir, vocab_size)
    pre = pre_tokenizer or detect_pre_tokenizer(tokenizer_dir)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab_log = logging.getLogger("gguf.vocab")
    quiet = _DropPairSeparatorWarning()
    vocab_log.addFilter(quiet)  # our post-processor's pair template: no sep token, nothing to warn about
    try:
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    finally:
        vocab_log.removeFilter(quiet)
    if not special.merges:
        raise GGUFExportError(f"{tokenizer_dir}/tokenizer.json has no BPE merges")
    if special.chat_template is None:
        chat = tokenizer_dir / "tokenizer_config.json"
        raise GGUFExportError(f"{chat} has no chat_template; the GGUF file embeds the chat template")
    special.add_to_gguf(writer, quiet=True)
    return pre


# --------------------------------------------------------------------------------------------- metadata
def _write_hparams(writer: Any, config: LFM2Config, ff_dim: int) -> None:
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(ff_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv([config.num_key_value_heads if t == "full_attention" else 0 for t in config.layer_types])
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_shortconv_l_cache(config.conv_L_cache)
    if config.head_dim is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.is_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        writer.add_leading_dense_block_count(config.num_dense_layers)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _dense_ff_dim(state: dict[str, torch.Tensor], config: LFM2Config) -> int:
    """The dense SwiGLU width as built (the weights are the truth; config rules have varied)."""
    for i in range(config.num_hidden_layers):
        w1 = state.get(f"model.layers.{i}.feed_forward.w1.weight")
        if w1 is not None:
            return int(w1.shape[0])
    return config.ff_dim  # an MoE model with no dense layer: llama.cpp reads the key but never uses it


# ------------------------------------------------------------------------------------------------- main
def export_gguf(source: str | Path, output: str | Path, dtype: str = "f16", *,
                tokenizer: str | Path | None = None, pre_tokenizer: str | None = None,
                name: str | None = None, output_dtype: str | None = None) -> dict[str, Any]:
    """Write the HF checkpoint directory `source` as the GGUF file `output`, atomically.

    `dtype` is one of `gguf_dtypes()`; `output_dtype` (also one of them; default: `dtype`) is the type of the
    output projection (`output.weight`, or `token_embd.weight` when the head is tied), which llama.cpp's
    `llama-quantize` keeps at more bits than a 4-bit body (its `--output-tensor-type`; the fast CPU path's
    q4_0 keeps its LM head at 8 bits the same way); `tokenizer` a directory with tokenizer.json (default: `source`);
    `pre_tokenizer` overrides the detected `tokenizer.ggml.pre`; `name` is `general.name` (default: the
    directory's name). Returns a summary (path, bytes, sha256, tensor types, metadata highlights).
    """
    for what, value in (("dtype", dtype), ("output dtype", output_dtype or dtype)):
        if value not in GGUF_DTYPES:
            raise GGUFExportError(f"GGUF {what} {value!r} is not one of {gguf_dtypes()} (k-quants need llama.cpp's "
                                  f"llama-quantize on an f16 / bf16 file)")
    source, output = Path(source), Path(output)
    config = read_config(source)
    check_supported(config)
    tok_dir = _tokenizer_dir(source, tokenizer)
    state = read_state_dict(source, config, dtype=None)  # stored dtypes; each tensor is freed once encoded
    ff_dim = _dense_ff_dim(state, config)
    arch = gguf_arch(config)

    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_name(name or source.resolve().name)
    writer.add_file_type(GGUF_DTYPES[dtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_hparams(writer, config, ff_dim)
    pre = _write_tokenizer(writer, tok_dir, config.vocab_size, pre_tokenizer)
    types: Counter[str] = Counter()
    fallbacks = []
    for tname, data in gguf_tensors(state, config):
        tensor_dtype = (output_dtype or dtype) if is_output_tensor(tname, config) else dtype
        encoded, qtype = encode_tensor(tname, data, tensor_dtype)
        writer.add_tensor(tname, encoded, raw_dtype=qtype)
        types[qtype.name] += 1
        if qtype == QT.F16 and GGUF_DTYPES[tensor_dtype][0] not in (QT.F16, QT.F32):
            fallbacks.append(tname)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    digest = hashlib.sha256()
    with output.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return {"path": str(output), "format": "gguf", "dtype": dtype, "output_dtype": output_dtype or dtype,
            "architecture": arch,
            "bytes": output.stat().st_size, "sha256": digest.hexdigest(), "tensor_types": dict(types),
            "f16_fallback": fallbacks, "pre_tokenizer": pre, "source": str(source)}
