"""The mergekit-style configuration: parsing, parameter lookup (gradients, filters), and refusals."""

from __future__ import annotations

import pytest

from lfm2_train.merge.config import MergeConfigError, evaluate_setting, load_merge_config, parse_merge_config


def _models(tmp_path, n=2):
    paths = []
    for i in range(n):
        (tmp_path / f"m{i}").mkdir(exist_ok=True)
        paths.append(str(tmp_path / f"m{i}"))
    return paths


def test_gradient_interpolates_over_t():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 0.5, 1.0], "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert evaluate_setting(0.3, "x", 0.9) == 0.3


def test_filters_pick_the_first_matching_condition():
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "feed_forward", "value": 0.9},
               {"value": 0.5}]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert evaluate_setting(setting, "model.layers.0.feed_forward.w1.weight", 0.0) == 0.9
    assert evaluate_setting(setting, "model.embed_tokens.weight", 0.0) == 0.5
    assert evaluate_setting([{"filter": "conv", "value": 1}], "model.embed_tokens.weight", 0.0) is None


def test_lookup_order_source_model_global_default(tmp_path):
    a, b = _models(tmp_path)
    spec = parse_merge_config({
        "merge_method": "ties", "base_model": a,
        "models": [{"model": b, "parameters": {"weight": [{"filter": "conv", "value": 2.0}]}}],
        "parameters": {"weight": 0.5, "density": 0.3, "normalize": False},
    })
    assert spec.tensor_param("weight", b, "model.layers.0.conv.in_proj.weight", 0.0, 0) == 2.0
    assert spec.tensor_param("weight", b, "model.layers.1.self_attn.q_proj.weight", 0.0, 0) == 0.5  # falls through
    assert spec.tensor_param("density", b, "x", 0.0, 0) == 0.3
    assert spec.global_param("normalize", "x", 0.0, 0) is False
    assert spec.global_param("rescale", "x", 0.0, 0) is False  # method default


def test_slices_form_and_slerp_t_per_filter(tmp_path):
    a, b = _models(tmp_path)
    spec = parse_merge_config({
        "merge_method": "slerp", "base_model": a,
        "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"value": 0.5}]},
        "dtype": "bf16",
    })
    assert spec.explicit_slices and spec.dtype == "bfloat16"
    assert spec.slices[0].sources[1].layer_range == (0, 4)
    assert spec.global_param("t", "model.layers.3.self_attn.q_proj.weight", 1.0, 0) == 1
    assert spec.global_param("t", "model.layers.3.conv.in_proj.weight", 1.0, 0) == 0.5


def test_yaml_file_relative_paths(tmp_path):
    _models(tmp_path)
    (tmp_path / "merge.yaml").write_text(
        "merge_method: linear\nmodels:\n  - model: m0\n    parameters: {weight: 1.0}\n"
        "  - model: m1\n    parameters: {weight: 2.0}\ndtype: float32\n")
    spec = load_merge_config(tmp_path / "merge.yaml")
    assert spec.models == [str((tmp_path / "m0").resolve()), str((tmp_path / "m1").resolve())]


@pytest.mark.parametrize("config, match", [
    ({"merge_method": "frankenstein", "models": ["a"]}, "unknown merge_method 'frankenstein'"),
    ({"merge_method": "ties", "base_model": "a", "models": ["b"], "parameters": {"densty": 0.5}},
     r"unknown parameter\(s\) \['densty'\] in parameters for merge_method ties"),
    ({"merge_method": "ties", "base_model": "a", "models": [{"model": "b", "parameters": {"normalize": True}}]},
     r"unknown parameter\(s\) \['normalize'\] in models\[0\]\.parameters.*top-level parameters"),
    ({"merge_method": "linear", "models": ["a"], "weights": [1]},
     r"unknown merge configuration key\(s\) \['weights'\]"),
    ({"merge_method": "slerp", "base_model": "a", "models": ["a", "b", "c"], "parameters": {"t": 0.5}},
     "slerp merges exactly two models"),
    ({"merge_method": "ties", "models": ["a", "b"]}, "needs base_model"),
    ({"merge_method": "model_stock", "base_model": "a", "models": ["b"]}, "at least two models"),
    ({"merge_method": "linear", "models": ["a"], "dtype": "int8"}, "dtype 'int8'"),
    ({"merge_method": "linear", "models": ["a"], "tokenizer_source": "union"}, "union is not supported"),
    ({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [{"filtr": "x", "value": 1}]}}]},
     "a condition is"),
])
def test_bad_configurations_are_named(tmp_path, monkeypatch, config, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MergeConfigError, match=match):
        parse_merge_config(config)


def test_missing_required_parameter_is_named(tmp_path):
    a, b = _models(tmp_path)
    spec = parse_merge_config({"merge_method": "linear", "models": [a, b]})
    with pytest.raises(MergeConfigError, match="needs parameter 'weight' for model"):
        spec.tensor_param("weight", a, "model.embed_tokens.weight", 0.0, 0)


def test_mergekit_parameter_scopes(tmp_path):
    """lambda / normalize / rescale are method-level (as in mergekit); gamma and epsilon per model;
    `rescale_mode` (ours) only where a sparsification can rescale; `filter: "*"` matches everything."""
    a, b, c = _models(tmp_path, 3)
    spec = parse_merge_config({
        "merge_method": "breadcrumbs_ties", "base_model": a,
        "models": [{"model": b, "parameters": {"weight": 1.0, "gamma": 0.2}},
                   {"model": c, "parameters": {"weight": 1}}],
        "parameters": {"lambda": [{"filter": "*", "value": 0.5}], "density": 0.7},
    })
    assert spec.global_param("lambda", "x", 0.0, 0) == 0.5
    assert spec.tensor_param("gamma", b, "x", 0.0, 0) == 0.2
    assert spec.tensor_param("gamma", c, "x", 0.0, 0) == 0.01  # mergekit's default
    assert spec.global_param("rescale_mode", "x", 0.0, 0) == "l1"
    with pytest.raises(MergeConfigError, match="lambda"):
        parse_merge_config({"merge_method": "della", "base_model": a,
                            "models": [{"model": b, "parameters": {"weight": 1.0, "lambda": 2.0}}]})
    with pytest.raises(MergeConfigError, match="lamda"):  # a typo is still an error
        parse_merge_config({"merge_method": "della", "base_model": a, "parameters": {"lamda": 2.0},
                            "models": [{"model": b, "parameters": {"weight": 1.0}}]})


def test_every_mergekit_method_is_accepted_with_its_input_counts(tmp_path):
    a, b, c = _models(tmp_path, 3)
    two = [{"model": b, "parameters": {"weight": 1.0}}, {"model": c, "parameters": {"weight": 1.0}}]
    # parameters another mergekit method uses are ignored with a note, as mergekit ignores them
    spec = parse_merge_config({"merge_method": "model_stock", "base_model": a, "models": two,
                               "parameters": {"density": 0.5}})
    assert "['weight'] in models[0].parameters are not used by merge_method model_stock" in spec.notes[1]
    assert "['density'] in parameters" in spec.notes[0]
    for name in ("nuslerp", "multislerp", "ties", "dare_linear", "breadcrumbs", "della_linear", "sce", "model_stock",
                 "task_arithmetic", "karcher", "linear"):
        spec = parse_merge_config({"merge_method": name, "base_model": a, "models": two,
                                   "parameters": {"weight": 1.0}})
        assert spec.method.name == name
    parse_merge_config({"merge_method": "nearswap", "base_model": a, "models": [a, b], "parameters": {"t": 0.1}})
    parse_merge_config({"merge_method": "multislerp", "models": two})  # base optional
    with pytest.raises(MergeConfigError, match="nuslerp merges exactly two"):
        parse_merge_config({"merge_method": "nuslerp", "base_model": a, "models": two[:1]})
    with pytest.raises(MergeConfigError, match="nearswap merges exactly two"):
        parse_merge_config({"merge_method": "nearswap", "base_model": a, "models": two, "parameters": {"t": 0.1}})
    with pytest.raises(MergeConfigError, match="passthrough takes exactly one"):
        parse_merge_config({"merge_method": "passthrough", "base_model": a, "models": [b]})
