"""Hugging Face export: a model directory copied (or re-cast) to a standalone directory, proven to load."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import torch

from ..artifacts import model_dir_problem, replace_dir, temp_sibling
from ..model import LFM2ForCausalLM

HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a model directory's files (not its subdirectories) atomically into `dst`."""
    tmp = temp_sibling(dst)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, dst)


def _recast_tree(src: Path, dst: Path, dtype: torch.dtype) -> None:
    """Write `src` with its weights in `dtype` (tokenizer and other files copied), atomically into `dst`."""
    tmp = temp_sibling(dst)
    LFM2ForCausalLM.from_pretrained(src, dtype="auto").save_pretrained(tmp, dtype=dtype)
    for f in sorted(src.iterdir()):
        if f.is_file() and not (tmp / f.name).exists() and not f.name.startswith(("model", "pytorch_model")):
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, dst)


def export_hf(model_dir: str | Path, target: str | Path, *, dtype: str | None = None,
              check_transformers: bool = True) -> dict[str, Any]:
    """Copy `model_dir` to `target` (weights re-cast when `dtype` is float32 / bfloat16 / float16) and prove
    it loads: in our model always, and in `transformers` (`AutoModelForCausalLM`, same logits) when it is
    installed — it is a dev extra, not a dependency."""
    model_dir, target = Path(model_dir), Path(target)
    problem = model_dir_problem(model_dir)
    if problem is not None:
        raise FileNotFoundError(f"export: {model_dir} is not a complete model directory ({problem})")
    if dtype is None:
        copy_tree(model_dir, target)
    elif dtype in HF_DTYPES:
        _recast_tree(model_dir, target, HF_DTYPES[dtype])
    else:
        raise ValueError(f"export: Hugging Face dtype {dtype!r} is not one of {sorted(HF_DTYPES)} (or None: as stored)")
    ours = LFM2ForCausalLM.from_pretrained(target).eval()
    ids = torch.arange(1, 17).unsqueeze(0) % ours.config.vocab_size  # (1, 16)
    with torch.no_grad():
        logits = ours(ids)  # (1, 16, V)
    summary: dict[str, Any] = {"status": "finished", "final": str(target),
                               "parameters": ours.num_parameters(), "transformers": None}
    if check_transformers and importlib.util.find_spec("transformers") is not None:
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = theirs(ids).logits
        diff = float((ref - logits).abs().max())
        summary["transformers"] = {"class": type(theirs).__name__, "max_abs_logit_diff": diff}
        if diff > 1e-3:
            raise RuntimeError(f"export: {target} loads in transformers but its logits differ by {diff:.2e}")
    return summary
