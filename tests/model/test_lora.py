"""LoRA adapters: init, freezing, disabling, folding, and the PEFT format both ways against `peft` on a
`transformers` Lfm2 model (same logits within 1e-4 in fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.model.lora import (
    LoRAConfig,
    LoRAError,
    apply_lora,
    disable_adapters,
    fold_lora,
    lora_state_dict,
    trainable_parameters,
)
from lfm2_train.model.peft_io import (
    PEFT_PREFIX,
    is_adapter_dir,
    load_model,
    read_adapter_config,
    read_adapter_state,
    save_adapter,
)

ATOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]


def build(preset: str = "tiny", seed: int = 0) -> LFM2ForCausalLM:
    torch.manual_seed(seed)
    return LFM2ForCausalLM(get_preset(preset)).eval()


def ids(seed: int = 0, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_default_init_is_the_identity_and_only_adapters_train() -> None:
    model = build()
    x = ids()
    before = logits(model, x)
    names = apply_lora(model, LoRAConfig(r=4, target_modules=ALL))
    assert torch.equal(logits(model, x), before)  # B = 0: the function is unchanged
    assert "model.layers.0.conv.in_proj" in names and "model.layers.1.self_attn.q_proj" in names
    assert not any("conv.conv" in n or "lm_head" in n for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    assert all(".lora_A.weight" in n or ".lora_B.weight" in n for n in trainable)
    # base keys are unchanged: the checkpoint layout does not move
    assert "model.layers.0.conv.in_proj.weight" in model.state_dict()
    n_train, n_total = trainable_parameters(model)
    assert 0 < n_train < n_total / 10


def test_random_adapter_changes_the_model_disable_restores_it_fold_keeps_it() -> None:
    model = build()
    x = ids()
    base = logits(model, x)
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=[*ALL, "embed_tokens"], init_lora_weights=False),
               generator=torch.Generator().manual_seed(1))
    adapted = logits(model, x)
    assert diff(adapted, base) > 1e-2
    with disable_adapters(model):
        assert torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), adapted)
    fold_lora(model)
    assert not lora_state_dict(model)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert not model.config.tie_word_embeddings  # the adapted embedding no longer equals the head
    assert diff(logits(model, x), adapted) < ATOL


def test_dropout_only_in_training_and_rslora_scaling() -> None:
    assert LoRAConfig(r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    assert LoRAConfig(r=16, lora_alpha=8).scaling == pytest.approx(0.5)
    model = build()
    apply_lora(model, LoRAConfig(r=4, lora_dropout=0.5, init_lora_weights=False))
    x = ids()
    assert torch.equal(logits(model, x), logits(model, x))  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(logits(model, x), logits(model, x))


def test_gradients_reach_only_the_adapters() -> None:
    model = build().train()
    apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "w2"], init_lora_weights="gaussian"))
    model(ids()).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    # B starts at zero, so A gets no gradient in the first step; B does
    assert any(n.endswith("lora_B.weight") for n in grads)


@pytest.mark.parametrize("targets, match", [
    (["conv"], "only linear layers"),
    (["nonexistent"], "matches no module"),
])
def test_bad_targets_are_named(targets, match) -> None:
    with pytest.raises(LoRAError, match=match):
        apply_lora(build(), LoRAConfig(r=2, target_modules=targets))


def test_regex_and_all_linear_targets() -> None:
    model = build()
    names = apply_lora(model, LoRAConfig(r=2, target_modules=r".*\.self_attn\.(q|v)_proj"))
    assert names and all(n.endswith(("q_proj", "v_proj")) for n in names)
    model = build()
    names = apply_lora(model, LoRAConfig(r=2, target_modules="all-linear"))
    assert "lm_head" not in names and any(n.endswith("w3") for n in names)


def test_bad_config_values_are_refused() -> None:
    with pytest.raises(LoRAError, match="positive"):
        LoRAConfig(r=0)
    with pytest.raises(LoRAError, match="pissa"):
        LoRAConfig(init_lora_weights="pissa")
    with pytest.raises(LoRAError, match="use_dora"):
        LoRAConfig.from_peft_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_dora": True})


# ---------------------------------------------------------------------------------------------- PEFT format
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("rslora, embed", [(False, False), (True, True)])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, rslora: bool, embed: bool) -> None:
    model = build()
    model.save_pretrained(tmp_path / "base")
    targets = [*ALL, "embed_tokens"] if embed else ALL
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=False,
                     base_model_name_or_path=str(tmp_path / "base"))
    apply_lora(model, cfg, generator=torch.Generator().manual_seed(3))
    save_adapter(lora_state_dict(model), cfg, tmp_path / "adapter")
    assert is_adapter_dir(tmp_path / "adapter") and not is_adapter_dir(tmp_path / "base")
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["use_rslora"] is rslora
    x = ids()
    theirs = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "adapter").eval()
    assert diff(logits(theirs, x), logits(model, x)) <= ATOL
    # every saved key is PEFT's and every PEFT adapter parameter was loaded from the file
    saved = read_adapter_state(tmp_path / "adapter")
    peft_keys = {k.replace(".default", "") for k in theirs.state_dict() if "lora_" in k}
    assert {PEFT_PREFIX + k for k in saved} == peft_keys


def test_peft_adapter_loads_in_ours_with_the_same_logits(tmp_path) -> None:
    build(seed=5).save_pretrained(tmp_path / "base")
    torch.manual_seed(7)
    config = peft.LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "in_proj", "w1", "w2"],
                             init_lora_weights=False, lora_dropout=0.1)
    theirs = peft.get_peft_model(_hf(tmp_path / "base"), config).eval()
    theirs.save_pretrained(tmp_path / "peft_adapter")
    assert read_adapter_config(tmp_path / "peft_adapter").lora_alpha == 32
    ours = load_model(tmp_path / "peft_adapter", base=tmp_path / "base").eval()  # folded into the base
    x = ids(1)
    assert diff(logits(ours, x), logits(theirs, x)) <= ATOL
