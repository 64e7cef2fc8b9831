"""The chain's last step: the chosen model as a standalone Hugging Face directory, checked by loading it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import torch

from ..artifacts import model_dir_problem, replace_dir, temp_sibling
from ..model import LFM2ForCausalLM


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a model directory's files (not its subdirectories) atomically into `dst`."""
    tmp = temp_sibling(dst)
    for f in sorted(src.iterdir()):
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, dst)


def export_model(model_dir: Path, out_dir: Path, check_transformers: bool = True) -> dict[str, Any]:
    """Copy `model_dir` to `<out_dir>/model` and prove it loads: in our model always, and in `transformers`
    (`AutoModelForCausalLM`, same logits) when it is installed — it is a dev extra, not a dependency."""
    problem = model_dir_problem(model_dir)
    if problem is not None:
        raise FileNotFoundError(f"export: {model_dir} is not a complete model directory ({problem})")
    target = out_dir / "model"
    copy_tree(model_dir, target)
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
