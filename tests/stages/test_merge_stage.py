"""`stage=merge` through Hydra: inline and YAML configurations, selection by evaluation, refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException

from lfm2_train.config import register_configs
from lfm2_train.merge import MergeConfigError
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


def _checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(path)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(path)
    return path


def _cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=["stage=merge", "logger=disabled",
                                                            f"output_dir={out}", *overrides])


def test_inline_linear_merge(tmp_path):
    a, b = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)
    models = f"[{{model: '{a}', parameters: {{weight: 1.0}}}}, {{model: '{b}', parameters: {{weight: 3.0}}}}]"
    summary = run_stage(_cfg(tmp_path / "run", "stage.merge_method=linear", f"stage.models={models}",
                             "stage.dtype=bfloat16", "stage.hash_inputs=false"))
    final = Path(summary["final"])
    merged = LFM2ForCausalLM.from_pretrained(final, dtype=None).state_dict()
    sa, sb = LFM2ForCausalLM.from_pretrained(a).state_dict(), LFM2ForCausalLM.from_pretrained(b).state_dict()
    key = "model.layers.0.conv.in_proj.weight"
    assert merged[key].dtype == torch.bfloat16
    assert torch.equal(merged[key], ((sa[key] + 3 * sb[key]) / 4).bfloat16())
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "linear"


def test_refusals(tmp_path):
    a, b = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)
    with pytest.raises(MergeConfigError, match="unknown merge_method 'avg'"):
        run_stage(_cfg(tmp_path / "r1", "stage.merge_method=avg", f"stage.models=['{a}']"))
    with pytest.raises(MergeConfigError, match="needs a merge configuration"):
        run_stage(_cfg(tmp_path / "r2"))
    (tmp_path / "slerp.yaml").write_text(f"merge_method: slerp\nbase_model: {a}\nmodels: [{a}, {b}]\n"
                                         "parameters: {t: 0.5}\n")
    with pytest.raises(MergeConfigError, match="stage.evaluation=none"):
        run_stage(_cfg(tmp_path / "r3", f"stage.config={tmp_path / 'slerp.yaml'}", "+stage.grid.t=[0.2,0.8]"))
    with pytest.raises(ConfigCompositionException):
        _cfg(tmp_path / "r4", "stage.merge_methd=linear")


@pytest.mark.slow
def test_yaml_grid_selected_by_validation_loss(tmp_path, tiny_dataset):
    a, b = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)
    (tmp_path / "slerp.yaml").write_text(
        f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n"
        "parameters:\n  t:\n    - filter: self_attn\n      value: [0.0, 1.0]\n    - value: 0.5\n")
    summary = run_stage(_cfg(tmp_path / "run", f"stage.config={tmp_path / 'slerp.yaml'}",
                             "+stage.grid.t=[0.3,0.7]", "stage.evaluation=val_loss",
                             f"data.path={tiny_dataset}", "data.seq_len=64", "stage.keep_candidates=false"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "selection.csv")))
    assert sorted(r["name"] for r in rows) == ["a", "b", "t=0.3", "t=0.7"]
    losses = [float(r["val_loss"]) for r in rows]
    assert losses == sorted(losses)
    assert summary["chosen"] == next(r["name"] for r in rows if r["kind"] == "merge")
    assert not (tmp_path / "run" / "candidates").exists()
    final = tmp_path / "run" / "final"
    LFM2ForCausalLM.from_pretrained(final)
    assert json.loads((final / "lfm2_train_manifest.json").read_text())["selection"]["metric"] == "val_loss"


def test_arithmetic_evaluation_scores_every_row(tmp_path):
    a, b = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "b", 1)
    models = f"[{{model: '{a}', parameters: {{weight: 1.0}}}}, {{model: '{b}', parameters: {{weight: 1.0}}}}]"
    summary = run_stage(_cfg(tmp_path / "run", "stage.merge_method=linear", f"stage.models={models}",
                             "stage.evaluation=arithmetic", "stage.eval_problems=3", "stage.eval_max_new_tokens=3",
                             "stage.hash_inputs=false"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "selection.csv")))
    assert len(rows) == 3 and all(0.0 <= float(r["arithmetic_accuracy"]) <= 1.0 for r in rows)
    assert summary["chosen"] == "linear"
