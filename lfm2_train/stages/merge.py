"""`stage=merge`: merge checkpoints with mergekit's methods, streamed tensor by tensor (docs/MERGE.md).

One configuration and no evaluation: the merge is written to `<output_dir>/final`. Several candidates
(`stage.candidates`, `stage.grid`) with `stage.evaluation`: each is merged and scored, the inputs are
scored too, `selection.csv` / `selection.md` rank them, and the best merge becomes `<output_dir>/final`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from ..data.resolve import resolve_dataset
from ..merge import MergeConfigError, merge_checkpoints, parse_merge_config
from ..merge.adapters import fold_adapter_inputs, merge_adapter_into
from ..merge.selection import arithmetic_evaluation, expand_candidates, select_merge, validation_loss_evaluation

INLINE_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "tokenizer_source",
               "expert_bias")
EVALUATIONS = {"val_loss": ("val_loss", False), "arithmetic": ("arithmetic_accuracy", True)}


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def merge_config_dict(stage: DictConfig) -> tuple[dict[str, Any], Path | None]:
    """The merge configuration: `stage.config`'s YAML with the inline fields laid over it."""
    data: dict[str, Any] = {}
    base_dir = None
    if stage.config:
        path = Path(stage.config)
        if not path.is_file():
            raise FileNotFoundError(f"stage.config={path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise MergeConfigError(f"stage.config={path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise MergeConfigError(f"stage.config={path} must hold a mapping (merge_method, models, ...)")
        base_dir = path.parent
    for key in INLINE_KEYS:
        value = _plain(stage[key])
        if key == "parameters" and value:  # inline parameters are laid over the file's, name by name
            data["parameters"] = {**(data.get("parameters") or {}), **value}
        elif key != "parameters" and value is not None:
            data[key] = value
            if key in ("models", "slices"):  # inline models replace the file's slices, and vice versa
                data.pop("slices" if key == "models" else "models", None)
    if not data.get("merge_method"):
        raise MergeConfigError("stage=merge needs a merge configuration: stage.config=<mergekit YAML> or inline "
                               "stage.merge_method=... stage.models=[...]")
    return data, base_dir


def fold_adapter(cfg: DictConfig) -> dict[str, Any]:
    """`stage.merge_adapter`: base + adapter written to `<output_dir>/final` (no merge method)."""
    stage = cfg.stage
    clashing = [k for k in ("config", "merge_method", "models", "slices", "candidates") if stage[k]]
    if clashing:
        raise MergeConfigError(f"stage.merge_adapter folds one adapter into its base; it does not combine with "
                               f"stage.{', stage.'.join(clashing)} — give adapter directories as merge inputs instead")
    dtype = getattr(torch, stage.dtype) if stage.dtype else None
    final = merge_adapter_into(stage.base_model, stage.merge_adapter, Path(cfg.output_dir) / "final", dtype=dtype,
                               max_shard_size=stage.max_shard_size)
    return {"final": str(final), "method": "fold_adapter", "adapter": stage.merge_adapter,
            "base_model": stage.base_model}


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    out_dir = Path(cfg.output_dir)
    if stage.merge_adapter:
        summary = fold_adapter(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        print(f"\nmerge: {json.dumps(summary, default=str)}")
        return summary
    data, base_dir = merge_config_dict(stage)
    candidates = expand_candidates(data, _plain(stage.candidates), _plain(stage.grid))
    folded: dict[str, str] = {}  # adapter inputs -> folded checkpoints under <output_dir>/folded, once each
    for candidate in candidates:
        candidate.config = fold_adapter_inputs(candidate.config, out_dir / "folded", base_dir, folded)
    kwargs = {"max_shard_size": stage.max_shard_size, "hash_inputs": stage.hash_inputs}
    if stage.evaluation == "none":
        if len(candidates) > 1:
            raise MergeConfigError(f"{len(candidates)} merge candidates but stage.evaluation=none: choose "
                                   f"val_loss or arithmetic to pick one")
        spec = parse_merge_config(candidates[0].config, base_dir=base_dir, seed=cfg.seed)
        summary = merge_checkpoints(spec, out_dir / "final", progress=True, **kwargs)
        summary["final"] = summary.pop("output")
    else:
        if stage.evaluation not in EVALUATIONS:
            raise ValueError(f"stage.evaluation={stage.evaluation!r}; choose none, {', '.join(EVALUATIONS)}")
        metric, higher = EVALUATIONS[stage.evaluation]
        if stage.evaluation == "val_loss":
            dataset_dir, _ = resolve_dataset(cfg.data)
            evaluate = validation_loss_evaluation(
                dataset_dir, seq_len=stage.eval_seq_len or cfg.data.seq_len,
                max_documents=stage.eval_max_documents or cfg.data.val_max_documents,
                batch_size=stage.eval_batch_size, seed=cfg.data.seed, val_fraction=cfg.data.val_fraction)
        else:
            evaluate = arithmetic_evaluation(n=stage.eval_problems, seed=cfg.seed,
                                             max_new_tokens=stage.eval_max_new_tokens,
                                             batch_size=stage.eval_batch_size,
                                             levels=tuple(stage.eval_levels) if stage.eval_levels else None)
        summary = select_merge(candidates, evaluate, metric, higher, out_dir, include_inputs=stage.include_inputs,
                               keep_candidates=stage.keep_candidates, seed=cfg.seed, base_dir=base_dir,
                               select_inputs=stage.select_inputs, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nmerge: {json.dumps(summary, default=str)}")
    return summary
