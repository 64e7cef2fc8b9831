"""The same mergekit YAML gives mergekit's numbers: outputs of mergekit 0.1.5 itself, made by
tests/merge/reference/make_refs.py in a separate environment and committed (no mergekit at test time).

Deterministic methods are compared tensor by tensor within 1e-5 on micro LFM2 checkpoints (conv kernel
included), also with a block size small enough that every multi-pass method crosses block boundaries.
Random-drop methods (DARE, DELLA) draw from different generators, so their statistics are compared:
keep rate, the rescale factor, keep rate by magnitude rank (DELLA), sign agreement.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lfm2_train.merge import load_merge_config, merge_checkpoints, methods

REF = Path(__file__).parent / "reference"
STATS = json.loads((REF / "mergekit_stats.json").read_text())
DETERMINISTIC = sorted(p.stem for p in (REF / "configs").glob("*.yaml") if STATS["configs"][p.stem] == "ok")


def _make_refs():
    spec = importlib.util.spec_from_file_location("make_refs", REF / "make_refs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _merged(tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    merge_checkpoints(load_merge_config(REF / "configs" / f"{name}.yaml", seed=0), tmp_path / name, hash_inputs=False)
    return load_file(tmp_path / name / "model.safetensors")


def test_every_listed_method_has_a_reference():
    methods_covered = {load_merge_config(REF / "configs" / f"{n}.yaml").method.name for n in DETERMINISTIC}
    assert methods_covered >= {"linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties",
                               "dare_ties", "breadcrumbs", "breadcrumbs_ties", "model_stock", "sce", "nearswap",
                               "passthrough"}


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_methods_match_mergekit(tmp_path, monkeypatch, name, chunk):
    if chunk:
        monkeypatch.setattr(methods, "CHUNK", chunk)
    expected = load_file(REF / "expected" / f"{name}.safetensors")
    ours = _merged(tmp_path, name)
    assert set(ours) == set(expected)
    for key, want in expected.items():
        torch.testing.assert_close(ours[key].float(), want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, key=key: f"{name} {key}: {m}")
    # the merge moved the tensors (nothing trivially equal to an input slipped through)
    base = load_file(REF / "models" / "base" / "model.safetensors")
    if name not in ("passthrough",):
        assert any(not torch.equal(ours[k], base[k]) for k in base)


def test_della_on_the_conv_kernel_works_where_mergekit_fails(tmp_path):
    assert "p_in" in STATS["configs"]["della_conv"]  # mergekit: bernoulli of NaN probabilities on (d, 1, k)
    ours = _merged(tmp_path, "della_conv")
    base = load_file(REF / "models" / "base" / "model.safetensors")
    conv = "model.layers.0.conv.conv.weight"
    assert ours[conv].shape == base[conv].shape == (8, 1, 3)
    assert all(torch.isfinite(v).all() for v in ours.values())
    assert not torch.equal(ours[conv], base[conv])


# ------------------------------------------------------------------------------------------ random drops
def _ours_stats(method: str, shape: tuple[int, ...], seed: int, refs) -> dict[str, float]:
    base, xs = refs._stat_inputs(torch, shape, seed)
    d, e = STATS["density"], STATS["epsilon"]

    def run(models):
        gens = [torch.Generator().manual_seed(100 * seed + i) for i in range(len(models))]
        kw = {"densities": [d] * len(models), "generators": gens, "ties": method in ("dare_ties", "della"),
              "normalize": False}
        if method.startswith("della"):
            return methods.della(base, models, [1.0] * len(models), epsilons=[e] * len(models), **kw)
        return methods.dare(base, models, [1.0] * len(models), **kw)

    row = refs.summarise(torch, base, xs, run(xs), single=False)
    row.update(refs.summarise(torch, base, xs[:1], run(xs[:1]), single=True))
    return row


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della_linear", "della"])
@pytest.mark.parametrize("label", ["matrix", "conv"])
def test_random_drop_statistics_match_mergekit(method, label):
    refs = _make_refs()
    shape = tuple(STATS["shapes"][label])
    ours = _mean([_ours_stats(method, shape, s, refs) for s in range(STATS["seeds"])])
    d, e = STATS["density"], STATS["epsilon"]
    theirs = STATS["methods"][f"{method}/{label}"]
    n = STATS["seeds"] * int(torch.Size(shape).numel())
    tol = 4 * (d * (1 - d) / n) ** 0.5 + 1e-3  # 4 standard errors of a keep rate
    # mergekit's rescale: one factor per tensor that restores the task vector's L1 norm exactly
    assert ours["l1_preserved"] == pytest.approx(1.0, abs=1e-6)
    assert ours["factor_std"] < 1e-4
    assert ours["keep_rate"] == pytest.approx(d, abs=tol)
    if method.startswith("della"):  # keep probability rises with magnitude rank: d - e/2 vs d + e/2 by half
        assert ours["keep_low_half"] == pytest.approx(d - e / 2, abs=3 * tol)
        assert ours["keep_high_half"] == pytest.approx(d + e / 2, abs=3 * tol)
    if isinstance(theirs, dict):  # mergekit crashed: record it, ours ran
        assert label == "conv" and method.startswith("della") and "p_in" in theirs["error"]
        return
    mk = _mean(theirs)
    assert mk["l1_preserved"] == pytest.approx(1.0, abs=1e-6) and mk["factor_std"] < 1e-4
    for key in ("keep_rate", "keep_low_half", "keep_high_half", "multi_keep_rate"):
        assert ours[key] == pytest.approx(mk[key], abs=3 * tol), key
    rel = 6 * ((1 - d) / (d * n)) ** 0.5  # ~4 standard errors of the difference of two relative means
    for key in ("factor_mean", "sign_agree", "l1_over_sum"):
        assert ours[key] == pytest.approx(mk[key], rel=rel), key
