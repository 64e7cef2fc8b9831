"""Reference outputs from mergekit itself, for tests/merge/test_mergekit_parity.py.

mergekit's dependency pins are not ours, so it lives in its own environment and this script has two
halves, run once each; only their small outputs are committed:

    # 1. inputs: three micro LFM2 checkpoints (hidden 8, vocab 16, layers conv / attention / conv) written
    #    with this package's exporter -> tests/merge/reference/models/{base,a,b}
    PYTHONPATH=. python tests/merge/reference/make_refs.py inputs
    # 2. mergekit: every configs/*.yaml merged by mergekit's own run_merge -> expected/<name>.safetensors,
    #    and statistics of its random-drop methods (DARE, DELLA) on larger tensors -> mergekit_stats.json
    python -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install torch==2.13.0 mergekit
    /tmp/mergekit-venv/bin/python tests/merge/reference/make_refs.py mergekit

The YAML files in configs/ are plain mergekit configurations (model paths relative to configs/); the
test runs the very same files through `load_merge_config`. Generated with mergekit 0.1.5, torch 2.13.0.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS, CONFIGS, EXPECTED = HERE / "models", HERE / "configs", HERE / "expected"
STATS = HERE / "mergekit_stats.json"

# statistics of the random-drop methods: one (rows, cols) matrix and LFM2's (d, 1, k) conv kernel
STAT_SHAPES = {"matrix": (256, 128), "conv": (256, 1, 3)}
STAT_DENSITY, STAT_EPSILON, STAT_SEEDS = 0.3, 0.1, 8


def make_inputs() -> None:
    """Base plus two fine-tunes sharing a common direction (so model_stock's angle is not ~90°)."""
    import torch

    from lfm2_train.model import LFM2Config, LFM2ForCausalLM

    config = LFM2Config(vocab_size=16, hidden_size=8, num_hidden_layers=3,
                        layer_types=["conv", "full_attention", "conv"], num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=16, block_auto_adjust_ff_dim=False,
                        conv_L_cache=3, tie_word_embeddings=True, max_position_embeddings=64)
    gen = torch.Generator().manual_seed(0)
    model = LFM2ForCausalLM(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in base.items():
        if v.is_floating_point():
            noise = torch.randn(v.shape, generator=gen) * 0.1
            v.copy_(noise + 1.0 if k.endswith("norm.weight") else noise)
    common = {k: torch.randn(v.shape, generator=gen) * 0.03 for k, v in base.items()}
    for name, offset in (("base", None), ("a", 1), ("b", 2)):
        state = {k: v.clone() for k, v in base.items()}
        if offset is not None:
            for k, v in state.items():
                v += common[k] + torch.randn(v.shape, generator=gen) * 0.03
        model.load_state_dict(state)
        model.save_pretrained(MODELS / name)
        print(f"wrote {MODELS / name}")


def _stat_inputs(torch, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen) * 0.1
    return base, [base + torch.randn(shape, generator=gen) * 0.02 for _ in range(3)]


def mergekit_stats() -> dict:
    """mergekit's DARE / DELLA on larger tensors, summarised (the draws are torch's global RNG, so only
    statistics can be compared): keep rate, L1 rescale factor, keep rate in the lower and upper half of
    magnitude ranks (DELLA), agreement of the merged sign with the elected sign (ties variants), and
    what happens on the conv kernel."""
    from importlib.metadata import version

    import torch
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    out: dict = {"mergekit": version("mergekit"), "torch": torch.__version__, "density": STAT_DENSITY,
                 "epsilon": STAT_EPSILON, "shapes": STAT_SHAPES, "seeds": STAT_SEEDS, "methods": {}}
    for method in ("dare_linear", "dare_ties", "della_linear", "della"):
        for label, shape in STAT_SHAPES.items():
            rows = []
            for seed in range(STAT_SEEDS):
                torch.manual_seed(1000 + seed)
                base, xs = _stat_inputs(torch, shape, seed)
                params = {"weight": [1.0] * 3, "density": [STAT_DENSITY] * 3, "normalize": False}
                if method.startswith("della"):
                    params["epsilon"] = [STAT_EPSILON] * 3
                group = TensorGroup.from_tensors([base, *xs], base_index=0, name=label)
                try:
                    (merged,) = merge_methods.get(method)((group,), parameters=params)
                except Exception as err:  # mergekit's DELLA on a (d, 1, k) kernel
                    rows = {"error": f"{type(err).__name__}: {err}"}
                    break
                rows.append(summarise(torch, base, xs, merged, single=False))
                # one model alone: the keep rate and rescale factor are directly visible
                group1 = TensorGroup.from_tensors([base, xs[0]], base_index=0, name=label)
                p1 = {k: v[:1] if isinstance(v, list) else v for k, v in params.items()}
                (merged1,) = merge_methods.get(method)((group1,), parameters=p1)
                rows[-1].update(summarise(torch, base, xs[:1], merged1, single=True))
            out["methods"][f"{method}/{label}"] = rows
    return out


def summarise(torch, base, xs, merged, single: bool) -> dict:
    """The statistics compared in tests/merge/test_mergekit_parity.py (also imported there)."""
    delta = (merged - base).double()
    taus = [(x - base).double() for x in xs]
    if single:
        tau = taus[0]
        kept = delta != 0
        factor = (delta[kept] / tau[kept])
        mags = tau.abs().reshape(tau.shape[0], -1)
        ranks = mags.argsort(1).argsort(1).double() / max(mags.shape[1] - 1, 1)
        by_rank = [float(kept.reshape(mags.shape)[(ranks >= lo) & (ranks <= lo + 0.5)].double().mean())
                   for lo in (0.0, 0.5)]
        return {"keep_rate": float(kept.double().mean()), "factor_mean": float(factor.mean()),
                "factor_std": float(factor.std()), "l1_preserved": float(delta.abs().sum() / tau.abs().sum()),
                "keep_low_half": by_rank[0], "keep_high_half": by_rank[1]}
    elected = torch.sign(sum(taus))
    nz = delta != 0
    return {"multi_keep_rate": float(nz.double().mean()),
            "sign_agree": float((torch.sign(delta[nz]) == elected[nz]).double().mean()),
            "l1_over_sum": float(delta.abs().sum() / sum(taus).abs().sum())}


def run_mergekit() -> None:
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    EXPECTED.mkdir(exist_ok=True)
    os.chdir(CONFIGS)  # model paths in the YAML files are relative to configs/
    results = {}
    work = Path(tempfile.mkdtemp(prefix="mergekit_refs_"))
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
        out = work / path.stem
        try:
            run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0,
                                                     quiet=True))
        except Exception as err:
            results[path.stem] = f"{type(err).__name__}: {err}"
            print(f"{path.stem}: mergekit failed: {results[path.stem]}")
            continue
        tensors = {}
        for f in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(f))
        save_file({k: v.to(torch.float32).contiguous() for k, v in tensors.items()},
                  EXPECTED / f"{path.stem}.safetensors")
        results[path.stem] = "ok"
        print(f"{path.stem}: {len(tensors)} tensors")
    stats = mergekit_stats()
    stats["configs"] = results
    STATS.write_text(json.dumps(stats, indent=1) + "\n")
    print(f"wrote {STATS}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "mergekit"
    if what == "inputs":
        make_inputs()
    elif what == "mergekit":
        run_mergekit()
    else:
        raise SystemExit(f"usage: {sys.argv[0]} inputs|mergekit")
