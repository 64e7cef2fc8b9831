"""Whole-checkpoint merges on tiny models: exactness, loading, MoE, slices, and every refusal."""

from __future__ import annotations

import json

import pytest
import torch

from lfm2_train.merge import MergeCompatibilityError, merge_checkpoints, parse_merge_config
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.model.hf_io import CheckpointError


def _state(path):
    return LFM2ForCausalLM.from_pretrained(path, dtype=None).state_dict()


def _merge(tmp_path, config, name="out", **kw):
    return merge_checkpoints(parse_merge_config(config), tmp_path / name, hash_inputs=False, **kw)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_linear_merge_of_a_model_with_itself_is_bit_exact(tmp_path, make_checkpoint, dtype):
    a = make_checkpoint(tmp_path / "a", dtype=dtype)
    _merge(tmp_path, {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1.0}}]})
    sa, so = _state(a), _state(tmp_path / "out")
    assert all(torch.equal(sa[k], so[k]) and sa[k].dtype == so[k].dtype for k in sa)
    b = make_checkpoint(tmp_path / "b", seed=1, dtype=dtype)
    # the soup of (a, a, b) with b weighted 0 is a again, bit for bit
    _merge(tmp_path, {"merge_method": "linear", "models": [
        {"model": str(a), "parameters": {"weight": 0.5}}, {"model": str(b), "parameters": {"weight": 0.0}}]},
        name="soup")
    so = _state(tmp_path / "soup")
    assert all(torch.equal(sa[k], so[k]) for k in sa)
    assert so["model.embed_tokens.weight"].dtype == (dtype or torch.float32)


def test_merged_directory_loads_in_transformers_and_ours(tmp_path, make_checkpoint):
    import transformers

    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b", seed=1)
    _merge(tmp_path, {"merge_method": "slerp", "base_model": str(a), "models": [str(a), str(b)],
                      "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]}})
    out = tmp_path / "out"
    ours = LFM2ForCausalLM.from_pretrained(out).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    sa, sb, so = _state(a), _state(b), ours.state_dict()
    # gradient over the attention layers (1 and 3 of 0..3): t = 1/3 and 1
    q1, q3 = "model.layers.1.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    assert torch.allclose(so[q3], sb[q3]) and not torch.allclose(so[q1], sa[q1])
    assert (out / "tokenizer.json").is_file()
    manifest = json.loads((out / "lfm2_train_manifest.json").read_text())
    assert manifest["merge_method"] == "slerp" and manifest["merge_config"]["parameters"]["t"]


def test_tiny_moe_merges_with_expert_bias_policy(tmp_path, make_checkpoint):
    base = make_checkpoint(tmp_path / "base", "tiny-moe")
    ft = [make_checkpoint(tmp_path / f"ft{i}", "tiny-moe", seed=i + 1) for i in range(2)]
    for policy in ("base", "mean"):
        _merge(tmp_path, {"merge_method": "dare_ties", "base_model": str(base), "expert_bias": policy, "seed": 3,
                          "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.6}} for p in ft]},
               name=f"out_{policy}")
    sb, s0, s1 = _state(base), _state(ft[0]), _state(ft[1])
    key = "model.layers.2.feed_forward.expert_bias"
    assert torch.equal(_state(tmp_path / "out_base")[key], sb[key])
    assert torch.allclose(_state(tmp_path / "out_mean")[key], (sb[key] + s0[key] + s1[key]) / 3)
    merged = _state(tmp_path / "out_base")
    assert merged["model.layers.2.feed_forward.experts.w1"].shape == sb["model.layers.2.feed_forward.experts.w1"].shape
    # DARE draws are seeded per tensor: the same seed gives the same merge
    _merge(tmp_path, {"merge_method": "dare_ties", "base_model": str(base), "seed": 3,
                      "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.6}} for p in ft]},
           name="again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "out_base" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"weight": 0.5}), ("ties", {"weight": 1.0, "density": 0.5}),
    ("dare_linear", {"weight": 0.5, "density": 0.5}), ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    ("della_linear", {"weight": 0.5, "density": 0.5, "epsilon": 0.1}), ("model_stock", {}),
])
def test_every_method_runs_end_to_end(tmp_path, make_checkpoint, method, params):
    base = make_checkpoint(tmp_path / "base")
    ft = [make_checkpoint(tmp_path / f"ft{i}", seed=i + 1) for i in range(2)]
    summary = _merge(tmp_path, {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                                "models": [{"model": str(p), "parameters": params} for p in ft]})
    state = _state(tmp_path / "out")
    assert summary["tensors"] == 40 and all(torch.isfinite(v.float()).all() for v in state.values())
    assert state["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_sharded_output_and_existing_output_refused(tmp_path, make_checkpoint):
    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b", seed=1)
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                {"model": str(b), "parameters": {"weight": 1}}]}
    summary = _merge(tmp_path, cfg, max_shard_size="100KB")
    assert summary["shards"] > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    sa, sb, so = _state(a), _state(b), _state(tmp_path / "out")
    assert all(torch.allclose(so[k], (sa[k] + sb[k]) / 2) for k in sa)
    with pytest.raises(FileExistsError, match="already exists"):
        _merge(tmp_path, cfg)


def test_slices_build_a_deeper_model(tmp_path, make_checkpoint):
    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b", seed=1)
    _merge(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 4]}]},
        {"sources": [{"model": str(b), "layer_range": [2, 4]}]}]})
    merged = LFM2ForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.num_hidden_layers == 6
    assert merged.config.layer_types[4:] == ["conv", "full_attention"]
    sb, so = _state(b), merged.state_dict()
    assert torch.equal(so["model.layers.5.self_attn.q_proj.weight"], sb["model.layers.3.self_attn.q_proj.weight"])
    with pytest.raises(MergeCompatibilityError, match="mixes layer types"):
        _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1.0}, "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [1, 3]}]}]},
            name="bad")


def test_shape_mismatch_names_the_first_tensor(tmp_path, make_checkpoint):
    a = make_checkpoint(tmp_path / "a")
    b = make_checkpoint(tmp_path / "b", intermediate_size=600)
    with pytest.raises(MergeCompatibilityError, match=r"ff_dim differs.*model\.layers\.0\.feed_forward\.w1\.weight"):
        _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1}, "models": [str(a), str(b)]})
    assert not (tmp_path / "out").exists()


def test_vocab_mismatch_is_refused(tmp_path, make_checkpoint):
    a = make_checkpoint(tmp_path / "a")
    b = make_checkpoint(tmp_path / "b", vocab_size=640, tokenizer=False)
    with pytest.raises(MergeCompatibilityError, match=r"vocab_size differs.*model\.embed_tokens\.weight"):
        _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1}, "models": [str(a), str(b)]})
    # same size, another tokenizer: the rows mean different tokens
    c = make_checkpoint(tmp_path / "c", seed=2)
    tok = json.loads((c / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (c / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MergeCompatibilityError, match="tokenizers differ"):
        _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1}, "models": [str(a), str(c)]})


def test_missing_tensor_is_an_error_not_a_skip(tmp_path, make_checkpoint):
    from safetensors.torch import load_file, save_file

    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b", seed=1)
    state = load_file(str(b / "model.safetensors"))
    del state["model.layers.2.conv.out_proj.weight"]
    save_file(state, str(b / "model.safetensors"))
    with pytest.raises(MergeCompatibilityError, match=r"model\.layers\.2\.conv\.out_proj\.weight is missing from"):
        _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1}, "models": [str(a), str(b)]})
    with pytest.raises(CheckpointError, match="gemma"):
        (b / "config.json").write_text(json.dumps({**json.loads((b / "config.json").read_text()),
                                                   "model_type": "gemma"}))
        _merge(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1}, "models": [str(a), str(b)]})


def test_manifest_hashes_inputs_and_notes_soft_differences(tmp_path, make_checkpoint):
    from lfm2_train.data.format import sha256_file

    a = make_checkpoint(tmp_path / "a")
    b = make_checkpoint(tmp_path / "b", seed=1, rope_theta=10_000.0, tokenizer=False)
    merge_checkpoints(parse_merge_config({"merge_method": "task_arithmetic", "base_model": str(a),
                                          "models": [{"model": str(b), "parameters": {"weight": 0.5}}]}),
                      tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "lfm2_train_manifest.json").read_text())
    assert manifest["inputs"][str(b)]["weights_sha256"]["model.safetensors"] == sha256_file(b / "model.safetensors")
    assert any("rope_theta differs" in n for n in manifest["notes"])
    assert any("no tokenizer.json" in n for n in manifest["notes"])
    assert LFM2ForCausalLM.from_pretrained(tmp_path / "out").config.rope_theta == 1_000_000.0
    assert manifest["tokenizer_source"] == str(a)
