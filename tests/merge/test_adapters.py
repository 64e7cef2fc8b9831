"""Folding LoRA adapters into full checkpoints: the folded directory computes what base + adapter computes
(ours unmerged, and `peft` on `transformers`), stacks fold, `stage=merge` folds adapters alone or as merge
inputs, and a mismatched adapter is named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from safetensors.torch import load_file, save_file

from lfm2_train.config import register_configs
from lfm2_train.merge.adapters import fold_adapter_inputs, merge_adapter_into
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.model.lora import LoRAConfig, LoRAError, apply_lora, lora_state_dict
from lfm2_train.model.peft_io import is_adapter_dir, load_model, save_adapter
from lfm2_train.stages import run_stage

ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]


def _adapter(base: Path, out: Path, seed: int, targets=ALL, r: int = 4) -> tuple[Path, LFM2ForCausalLM]:
    """A random (non-identity) adapter on `base` (a checkpoint or adapter directory); -> (dir, unmerged model)."""
    model = load_model(base).eval()
    cfg = LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False,
                     base_model_name_or_path=str(base))
    apply_lora(model, cfg, generator=torch.Generator().manual_seed(seed))
    save_adapter(lora_state_dict(model), cfg, out)
    return out, model


def _logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


X = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("targets", [ALL, [*ALL, "embed_tokens"]])
def test_folded_checkpoint_equals_base_plus_adapter_in_ours_and_transformers(tmp_path, make_checkpoint, targets):
    transformers = pytest.importorskip("transformers")
    base = make_checkpoint(tmp_path / "base")
    adapter, unmerged = _adapter(base, tmp_path / "adapter", seed=1, targets=targets)
    out = merge_adapter_into(None, adapter, tmp_path / "folded")
    assert (out / "tokenizer.json").is_file() and not is_adapter_dir(out)
    manifest = json.loads((out / "lfm2_train_manifest.json").read_text())
    assert manifest["merge_method"] == "fold_adapter" and len(manifest["adapter_sha256"]) == 64
    ours = LFM2ForCausalLM.from_pretrained(out).eval()
    assert ours.config.tie_word_embeddings == ("embed_tokens" not in targets)
    want = _logits(unmerged, X)
    assert (_logits(ours, X) - want).abs().max() <= 1e-4
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (_logits(theirs, X) - want).abs().max() <= 1e-4


def test_bf16_base_stays_bf16_and_stacks_fold(tmp_path, make_checkpoint):
    base = make_checkpoint(tmp_path / "base", dtype=torch.bfloat16)
    first, _ = _adapter(base, tmp_path / "a1", seed=2)
    out = merge_adapter_into(None, first, tmp_path / "f1")
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    # an adapter trained on top of the first adapter's model folds through the whole stack
    second, unmerged = _adapter(first, tmp_path / "a2", seed=3, targets=["q_proj", "w2"])
    stacked = merge_adapter_into(None, second, tmp_path / "f2", dtype=torch.float32)
    got = LFM2ForCausalLM.from_pretrained(stacked).eval()
    assert (_logits(got, X) - _logits(unmerged, X)).abs().max() <= 1e-4


def test_an_adapter_for_another_model_is_named(tmp_path, make_checkpoint):
    base = make_checkpoint(tmp_path / "base")
    adapter, _ = _adapter(base, tmp_path / "adapter", seed=1, targets=["q_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in weights if k.endswith("lora_B.weight"))
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(LoRAError, match="another model"):
        merge_adapter_into(base, adapter, tmp_path / "out")


def _merge_cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=["stage=merge", "logger=disabled", f"output_dir={out}",
                                                             *overrides])


def test_merge_stage_folds_an_adapter_and_merges_adapter_inputs(tmp_path, make_checkpoint):
    base = make_checkpoint(tmp_path / "base")
    a, _ = _adapter(base, tmp_path / "a", seed=4)
    b, _ = _adapter(base, tmp_path / "b", seed=5)
    summary = run_stage(_merge_cfg(tmp_path / "fold", f"stage.merge_adapter={a}"))
    folded_a = LFM2ForCausalLM.from_pretrained(summary["final"]).state_dict()
    expected_a = load_model(a).state_dict()
    assert all(torch.equal(folded_a[k], expected_a[k]) for k in expected_a)
    with pytest.raises(ValueError, match="does not combine"):
        run_stage(_merge_cfg(tmp_path / "bad", f"stage.merge_adapter={a}", "stage.merge_method=linear",
                             f"stage.models=[{b}]"))
    # a linear merge over two adapters = the average of the two folded models (task vectors of full weights)
    run_stage(_merge_cfg(tmp_path / "soup", "stage.merge_method=linear", f"stage.models=[{a},{b}]",
                         "+stage.parameters.weight=1.0", "stage.hash_inputs=false"))
    soup = LFM2ForCausalLM.from_pretrained(tmp_path / "soup" / "final").state_dict()
    expected_b = load_model(b).state_dict()
    for key in expected_a:
        assert torch.allclose(soup[key], (expected_a[key] + expected_b[key]) / 2, atol=1e-6), key
    # inputs already folded once are reused, and non-adapter inputs pass through unchanged
    folded: dict[str, str] = {}
    raw = {"merge_method": "linear", "base_model": str(base), "models": [str(a), {"model": str(a)}]}
    cfg = fold_adapter_inputs(raw, tmp_path / "w", folded=folded)
    assert cfg["base_model"] == str(base) and cfg["models"][0] == cfg["models"][1]["model"] and len(folded) == 1
