"""Fold PEFT LoRA adapters into full checkpoints, so they can be deployed or merged like any model.

    merge_adapter_into(base_dir, adapter_dir, out_dir)     base + s * B @ A, written as an HF directory
    fold_adapter_inputs(config, workdir)                  a merge configuration whose adapter inputs are
                                                          replaced by folded checkpoints

Folding is exact up to the output dtype: each delta is computed in fp32 and added to the base tensor in
fp32, then cast back to the base's dtype (or `dtype`). Merge methods (linear, TIES, ...) act on task
vectors of full weights; a linear combination of the A and B factors is not the combination of the deltas,
so adapters are always folded before a merge method sees them. An adapter whose base is itself an adapter
directory (preference-LoRA on an SFT-LoRA model) folds the whole stack.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..artifacts import adapter_sha256
from ..model.config import LFM2Config
from ..model.hf_io import read_config, write_checkpoint
from ..model.lfm2 import read_state_dict
from ..model.lora import LoRAError, lora_delta
from ..model.peft_io import ADAPTER_CONFIG, adapter_base, is_adapter_dir, read_adapter_config, read_adapter_state

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json")
_LINEAR = re.compile(r"^(.*)\.lora_(A|B)\.weight$")
_EMBED = re.compile(r"^(.*)\.lora_embedding_(A|B)$")


def apply_adapter_to_state(state: dict[str, torch.Tensor], config: LFM2Config, adapter_dir: str | Path
                           ) -> tuple[dict[str, torch.Tensor], LFM2Config]:
    """`state` (our keys, as `read_state_dict` returns it) with the adapter's deltas added — adapted tensors
    come back in fp32, so a stack of adapters is rounded once, at the end; an adapted tied embedding unties
    the head, which keeps the base matrix (PEFT's unmerged semantics)."""
    lora = read_adapter_config(adapter_dir)
    pairs: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
    for key, tensor in read_adapter_state(adapter_dir).items():
        m = _LINEAR.match(key) or _EMBED.match(key)
        if m is None:
            raise LoRAError(f"{adapter_dir}: unexpected adapter tensor {key}")
        pairs.setdefault((m.group(1), m.re is _EMBED), {})[m.group(2)] = tensor
    out = dict(state)
    for (module, embedding), ab in sorted(pairs.items()):
        key = f"{module}.weight"
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{adapter_dir}: {module} has lora_{'/'.join(ab)} but not both A and B")
        if key not in out:
            raise LoRAError(f"{adapter_dir}: adapter for {module}, which the base model does not have")
        base = out[key]
        delta = lora_delta(ab["A"], ab["B"], lora.scaling, embedding)
        if tuple(delta.shape) != tuple(base.shape):
            raise LoRAError(f"{adapter_dir}: {module} update has shape {tuple(delta.shape)}, the base weight "
                            f"{tuple(base.shape)} (an adapter for another model?)")
        if embedding and config.tie_word_embeddings:
            out["lm_head.weight"] = base
            config = config.replace(tie_word_embeddings=False)
        out[key] = base.float() + delta
    return out, config


def _folded_state(path: Path) -> tuple[dict[str, torch.Tensor], LFM2Config, Path, torch.dtype]:
    """(state, config, the full checkpoint at the bottom of the stack, its stored dtype) for a checkpoint or
    adapter directory."""
    if not is_adapter_dir(path):
        config = read_config(path)
        state = read_state_dict(path, config)
        return state, config, path, state["model.embed_tokens.weight"].dtype
    state, config, root, stored = _folded_state(adapter_base(path))
    state, config = apply_adapter_to_state(state, config, path)
    return state, config, root, stored


def merge_adapter_into(base_dir: str | Path | None, adapter_dir: str | Path, out_dir: str | Path, *,
                       dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB") -> Path:
    """Write `base + adapter` (fold) as a Hugging Face directory that loads in `transformers` and in ours.

    `base_dir=None` takes the base the adapter records (`base_model_name_or_path`); the base may itself be an
    adapter directory. The output has the base checkpoint's dtype unless `dtype` is given. Tokenizer files
    come from the adapter directory when it has them, else from the base.
    """
    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no {ADAPTER_CONFIG})")
    base = Path(base_dir) if base_dir is not None else adapter_base(adapter_dir)
    state, config, root, stored = _folded_state(base)
    state, config = apply_adapter_to_state(state, config, adapter_dir)
    out = Path(out_dir)
    write_checkpoint(state, config, out, dtype=dtype or stored, max_shard_size=max_shard_size)
    if (root / "generation_config.json").is_file():
        shutil.copy2(root / "generation_config.json", out / "generation_config.json")
    tok_dir = next((d for d in (adapter_dir, base, root) if (d / "tokenizer.json").is_file()), None)
    for name in TOKENIZER_FILES if tok_dir is not None else ():
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, out / name)
    manifest = {"stage": "merge", "merge_method": "fold_adapter", "base_model": str(base.resolve()),
                "adapter": str(adapter_dir.resolve()), "adapter_sha256": adapter_sha256(adapter_dir),
                "lora": read_adapter_config(adapter_dir).to_peft_dict(),
                "tie_word_embeddings": config.tie_word_embeddings,
                "tokenizer_source": str(tok_dir) if tok_dir is not None else None}
    (out / "lfm2_train_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def _model_dir(value: Any, base_dir: Path | None) -> Path | None:
    if not isinstance(value, (str, Path)):
        return None
    path = Path(str(value).removeprefix("model:")).expanduser()
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        path = base_dir / path
    return path


def fold_adapter_inputs(config: dict[str, Any], workdir: str | Path, base_dir: Path | None = None,
                        folded: dict[str, str] | None = None) -> dict[str, Any]:
    """A copy of a mergekit-style configuration with every adapter directory among `base_model`,
    `models[].model` and `slices[].sources[].model` folded into `workdir/<name>-<hash>` (once per adapter:
    pass the same `folded` dict across candidates)."""
    folded = {} if folded is None else folded
    workdir = Path(workdir)

    def resolve(value: Any) -> Any:
        path = _model_dir(value, base_dir)
        if path is None or not is_adapter_dir(path):
            return value
        key = str(path.resolve())
        if key not in folded:
            target = workdir / f"{path.resolve().parent.name}-{path.name}-{adapter_sha256(path)[:10]}"
            if not (target / "config.json").is_file():
                merge_adapter_into(None, path, target)
            folded[key] = str(target)
        return folded[key]

    out = json.loads(json.dumps(config, default=str))
    if out.get("base_model"):
        out["base_model"] = resolve(out["base_model"])
    for i, entry in enumerate(out.get("models") or []):
        if isinstance(entry, dict) and "model" in entry:
            entry["model"] = resolve(entry["model"])
        else:
            out["models"][i] = resolve(entry)
    for sl in out.get("slices") or []:
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            if isinstance(src, dict) and "model" in src:
                src["model"] = resolve(src["model"])
    return out
