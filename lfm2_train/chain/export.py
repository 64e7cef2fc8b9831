"""The chain's last step: the chosen model as a standalone Hugging Face directory, checked by loading it,
and optionally as llama.cpp GGUF files beside it (`gguf: [q8_0, ...]` in the step's args)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..export import export_gguf, export_hf


def export_model(model_dir: Path, out_dir: Path, check_transformers: bool = True,
                 gguf: str | list[str] | None = None) -> dict[str, Any]:
    """Copy `model_dir` to `<out_dir>/model` and prove it loads (lfm2_train.export.export_hf); for each
    dtype in `gguf`, also write `<out_dir>/model-<dtype>.gguf` from the copied directory."""
    summary = export_hf(model_dir, Path(out_dir) / "model", check_transformers=check_transformers)
    dtypes = [gguf] if isinstance(gguf, str) else list(gguf or [])
    if dtypes:
        summary["gguf"] = {d: export_gguf(summary["final"], Path(out_dir) / f"model-{d}.gguf", d) for d in dtypes}
    return summary
