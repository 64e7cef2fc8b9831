"""Checkpoint I/O against `transformers`: ours -> transformers, transformers -> ours, sharding, the on-disk key
layout, error messages for bad directories, dtype handling, and greedy generation agreement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lfm2_train.inference import generate
from lfm2_train.model import CheckpointError, LFM2ForCausalLM, get_preset

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def build(name: str, seed: int = 0, **changes) -> LFM2ForCausalLM:
    cfg = get_preset(name)
    if changes:
        cfg = cfg.replace(**changes)
    torch.manual_seed(seed)
    model = LFM2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.moe_layers():
        m.expert_bias.copy_(torch.randn(m.expert_bias.shape, generator=g) * 0.3)
    return model


def hf_load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def disk_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


def ids_batch(seed: int = 0, shape=(2, 13)) -> torch.Tensor:
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def assert_same_state(a: LFM2ForCausalLM, b: LFM2ForCausalLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def hf_tiny_config(moe: bool):
    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048,
                  layer_types=["conv", "full_attention", "conv", "full_attention"], eos_token_id=7)
    if moe:
        return transformers.Lfm2MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4,
                                          num_experts_per_tok=2, num_dense_layers=1, **common)
    return transformers.Lfm2Config(intermediate_size=192, **common)


# ---------------------------------------------------------------------------------------------- ours -> HF
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_ours_to_transformers_same_logits(name: str, tmp_path) -> None:
    ours = build(name)
    ours.save_pretrained(tmp_path)
    hf = hf_load(tmp_path)
    assert type(hf).__name__ == ("Lfm2MoeForCausalLM" if ours.config.is_moe else "Lfm2ForCausalLM")
    ids = ids_batch()
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert max_diff(a, b) <= ATOL
    if ours.config.is_moe:
        for i in range(1, 4):
            torch.testing.assert_close(hf.model.layers[i].feed_forward.expert_bias,
                                       ours.model.layers[i].feed_forward.expert_bias, atol=0, rtol=0)
            assert hf.model.layers[i].feed_forward.expert_bias.abs().sum() > 0


@pytest.mark.parametrize(
    "name, changes",
    [
        ("tiny", {"conv_bias": True}),
        ("tiny", {"head_dim": 32}),
        ("tiny", {"rope_theta": 10_000.0, "norm_eps": 1e-6}),
        ("tiny", {"conv_L_cache": 4}),
        ("tiny", {"block_auto_adjust_ff_dim": False, "intermediate_size": 96}),
        ("tiny-moe", {"use_expert_bias": False}),
        ("tiny-moe", {"routed_scaling_factor": 2.5, "norm_topk_prob": False, "num_dense_layers": 2}),
    ],
)
def test_config_variants_match_transformers(name: str, changes: dict, tmp_path) -> None:
    ours = build(name, **changes)
    with torch.no_grad():  # make every bias (zero at init) visible in the logits
        for pname, p in ours.named_parameters():
            if pname.endswith(".bias"):
                p.normal_(0, 0.1)
    ours.save_pretrained(tmp_path)
    hf = hf_load(tmp_path)
    ids = ids_batch(2)
    with torch.no_grad():
        assert max_diff(ours(ids), hf(ids).logits) <= ATOL
    assert_same_state(ours, LFM2ForCausalLM.from_pretrained(tmp_path))


def test_untied_ours_to_transformers(tmp_path) -> None:
    ours = build("tiny", tie_word_embeddings=False)
    ours.save_pretrained(tmp_path)
    assert "lm_head.weight" in disk_keys(tmp_path)
    hf = hf_load(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        assert max_diff(ours(ids), hf(ids).logits) <= ATOL
    back = LFM2ForCausalLM.from_pretrained(tmp_path)
    assert_same_state(ours, back)
    assert back.lm_head.weight.data_ptr() != back.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------------------- HF -> ours
@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("sharded", [False, True])
def test_transformers_to_ours_same_logits(moe: bool, sharded: bool, tmp_path) -> None:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_tiny_config(moe)).eval()
    if moe:
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                layer.feed_forward.expert_bias.copy_(torch.randn(4) * 0.3)
    hf.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if sharded else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ours = LFM2ForCausalLM.from_pretrained(tmp_path)
    assert ours.config.is_moe == moe
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = ids_batch(1)
    with torch.no_grad():
        assert max_diff(ours(ids), hf(ids).logits) <= ATOL
    if moe:
        assert ours.model.layers[2].feed_forward.expert_bias.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_our_round_trip_is_exact(name: str, tmp_path) -> None:
    ours = build(name)
    ours.save_pretrained(tmp_path)
    back = LFM2ForCausalLM.from_pretrained(tmp_path)
    assert back.config == ours.config
    assert_same_state(ours, back)
    assert back.lm_head.weight is back.model.embed_tokens.weight
    assert not any(p.is_meta for p in back.parameters())
    assert not any(b.is_meta for b in back.buffers())
    ids = ids_batch()
    with torch.no_grad():
        assert torch.equal(ours(ids), back(ids))


def test_fused_expert_layout_is_read(tmp_path) -> None:
    """transformers' in-memory layout (experts.gate_up_proj / experts.down_proj) loads too."""
    ours = build("tiny-moe")
    ours.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    fused: dict[str, torch.Tensor] = {k: v for k, v in state.items() if ".experts." not in k}
    for i in range(1, 4):
        p = f"model.layers.{i}.feed_forward.experts"
        w1 = torch.stack([state[f"{p}.{j}.w1.weight"] for j in range(4)])
        w3 = torch.stack([state[f"{p}.{j}.w3.weight"] for j in range(4)])
        fused[f"{p}.gate_up_proj"] = torch.cat([w1, w3], dim=1).contiguous()
        fused[f"{p}.down_proj"] = torch.stack([state[f"{p}.{j}.w2.weight"] for j in range(4)])
    save_file(fused, str(tmp_path / "model.safetensors"))
    assert_same_state(ours, LFM2ForCausalLM.from_pretrained(tmp_path))


# ---------------------------------------------------------------------------------------------- sharding / layout
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_sharded_save_loads_back(name: str, tmp_path) -> None:
    ours = build(name)
    ours.save_pretrained(tmp_path, max_shard_size=100_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    assert not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == disk_keys(tmp_path)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            nbytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
            assert nbytes <= 100_000 or len(list(f.keys())) == 1
    assert_same_state(ours, LFM2ForCausalLM.from_pretrained(tmp_path))
    hf = hf_load(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        assert max_diff(ours(ids), hf(ids).logits) <= ATOL


def test_resave_unsharded_removes_stale_shards(tmp_path) -> None:
    ours = build("tiny")
    ours.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob("model-*-of-*.safetensors"))
    assert_same_state(ours, LFM2ForCausalLM.from_pretrained(tmp_path))


def test_saved_keys(tmp_path) -> None:
    ours = build("tiny-moe")
    ours.save_pretrained(tmp_path)
    keys = disk_keys(tmp_path)
    for i in (1, 2, 3):
        for j in range(4):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{i}.feed_forward.experts.{j}.{w}.weight" in keys
        assert f"model.layers.{i}.feed_forward.expert_bias" in keys
        assert f"model.layers.{i}.feed_forward.gate.weight" in keys
    assert "model.layers.0.feed_forward.w1.weight" in keys  # the dense first layer
    assert "model.layers.0.feed_forward.expert_bias" not in keys
    assert "lm_head.weight" not in keys
    assert not any(k.endswith((".experts.w1", ".experts.w2", ".experts.w3")) for k in keys)
    assert not any("inv_freq" in k or "expert_load" in k for k in keys)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert tuple(f.get_tensor("model.layers.1.feed_forward.experts.2.w1.weight").shape) == (32, 64)
        assert tuple(f.get_tensor("model.layers.1.feed_forward.experts.2.w2.weight").shape) == (64, 32)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0}


def test_bf16_save_and_auto_dtype(tmp_path) -> None:
    ours = build("tiny-moe")
    ours.save_pretrained(tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.feed_forward.expert_bias").dtype == torch.float32
    auto = LFM2ForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert auto.model.embed_tokens.weight.dtype == torch.bfloat16
    assert auto.model.layers[1].feed_forward.experts.w1.dtype == torch.bfloat16
    assert auto.model.layers[1].feed_forward.expert_bias.dtype == torch.float32
    torch.testing.assert_close(auto.model.embed_tokens.weight, ours.model.embed_tokens.weight.bfloat16(), atol=0,
                               rtol=0)
    by_name = LFM2ForCausalLM.from_pretrained(tmp_path, dtype="bfloat16")
    assert by_name.model.layers[0].conv.in_proj.weight.dtype == torch.bfloat16
    fp32 = LFM2ForCausalLM.from_pretrained(tmp_path)  # default: fp32
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    ids = ids_batch(shape=(1, 6))
    with torch.no_grad():
        assert max_diff(auto(ids), ours(ids)) < 0.1  # bf16 rounding only


def test_saved_config_dtype_matches_saved_tensors(tmp_path) -> None:
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_tiny_config(moe=False))
    hf.save_pretrained(tmp_path / "hf")  # config.json: "dtype": "float32"
    ours = LFM2ForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        assert written.get(key, "bfloat16") == "bfloat16", f"config.json {key}={written[key]!r} but tensors are bf16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert reloaded.dtype == torch.bfloat16


def test_pytorch_bin_checkpoint_is_read(tmp_path) -> None:
    ours = build("tiny-moe")
    ours.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert_same_state(ours, LFM2ForCausalLM.from_pretrained(tmp_path))


def test_parse_shard_size() -> None:
    from lfm2_train.model.hf_io import _parse_size

    assert _parse_size(123) == 123
    assert _parse_size("5GB") == 5 * 10**9
    assert _parse_size("100KB") == 100_000
    assert _parse_size("1.5MiB") == int(1.5 * 2**20)
    assert _parse_size("42") == 42
    with pytest.raises(ValueError, match="shard size"):
        _parse_size("five gigs")


def test_attn_implementation_override(tmp_path) -> None:
    build("tiny").save_pretrained(tmp_path)
    model = LFM2ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config.attn_implementation == "eager"
    assert model.model.layers[1].self_attn.backend == "eager"


# ---------------------------------------------------------------------------------------------- errors
def test_other_model_type_raises(tmp_path) -> None:
    build("tiny").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'llama'"):
        LFM2ForCausalLM.from_pretrained(tmp_path)


def test_missing_tensor_raises_naming_it(tmp_path) -> None:
    build("tiny").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.2.conv.out_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.conv\.out_proj\.weight"):
        LFM2ForCausalLM.from_pretrained(tmp_path)


def test_missing_expert_raises_naming_it(tmp_path) -> None:
    build("tiny-moe").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.2.feed_forward.experts.3.w3.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.2\.feed_forward\.experts.*\[3\].*w3"):
        LFM2ForCausalLM.from_pretrained(tmp_path)


def test_unexpected_tensor_raises_naming_it(tmp_path) -> None:
    build("tiny").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.0.conv.extra_thing.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"extra_thing"):
        LFM2ForCausalLM.from_pretrained(tmp_path)


def test_wrong_shape_raises_naming_it(tmp_path) -> None:
    build("tiny").save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(16, 64\)"):
        LFM2ForCausalLM.from_pretrained(tmp_path)


def test_config_weights_mismatch_raises(tmp_path) -> None:
    build("tiny").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 600  # effective width 512 instead of the stored 256
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"feed_forward\.w1\.weight"):
        LFM2ForCausalLM.from_pretrained(tmp_path)


def test_missing_directory_and_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        LFM2ForCausalLM.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LFM2ForCausalLM.from_pretrained(tmp_path)
    get_preset("tiny").save(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LFM2ForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_greedy_generate_matches_transformers(name: str, tmp_path) -> None:
    ours = build(name, seed=3)
    ours.save_pretrained(tmp_path)
    hf = hf_load(tmp_path)
    prompt = ids_batch(4, shape=(1, 7))
    n = 8
    mine = generate(ours, prompt[0].tolist(), max_new_tokens=n, stop_token_ids=[ours.config.eos_token_id])
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=ours.config.eos_token_id,
                             pad_token_id=ours.config.pad_token_id)
    theirs = theirs[0, prompt.shape[1]:].tolist()
    assert len(mine.tokens[0]) >= 1
    assert mine.tokens[0] == theirs[:len(mine.tokens[0])]
    assert len(mine.tokens[0]) == len(theirs) or mine.finish_reasons[0] == "stop"


def test_left_padded_batch_generate_matches_transformers(tmp_path) -> None:
    ours = build("tiny", seed=4, initializer_range=0.2)
    ours.save_pretrained(tmp_path)
    hf = hf_load(tmp_path)
    prompts = [ids_batch(7, shape=(1, 6))[0].tolist(), ids_batch(8, shape=(1, 2))[0].tolist(),
               ids_batch(9, shape=(1, 4))[0].tolist()]
    n = 6
    mine = generate(ours, prompts, max_new_tokens=n)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert mine.tokens == theirs[:, T:].tolist()
    assert len({tuple(t) for t in mine.tokens}) == 3


def test_repetition_penalty_generate_matches_transformers(tmp_path) -> None:
    ours = build("tiny", seed=5)
    ours.save_pretrained(tmp_path)
    hf = hf_load(tmp_path)
    prompt = ids_batch(6, shape=(1, 5))
    n = 8
    mine = generate(ours, prompt[0].tolist(), max_new_tokens=n, repetition_penalty=1.8)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=n, min_new_tokens=0, do_sample=False, repetition_penalty=1.8,
                             eos_token_id=None, pad_token_id=0)
    assert mine.tokens[0] == theirs[0, prompt.shape[1]:].tolist()
