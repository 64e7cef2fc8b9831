"""`stage=export`: a trained model directory as a Hugging Face directory or a llama.cpp GGUF file.

`stage.source` is a model directory, a PEFT adapter directory (folded into its base) or a training checkpoint
(`checkpoints/step-N/`, sharded: its weights are gathered in one process). `stage.format=hf` copies the
directory (optionally re-cast to `stage.dtype`) and proves it loads, in our
model and in `transformers`; `stage.format=gguf` writes one GGUF file with the tokenizer and chat template
embedded (lfm2_train/export/gguf.py). Both write atomically; docs/DEPLOY.md has the whole path to llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..engine.dcp import DCP_DIR, export_checkpoint
from ..export import export_gguf, export_hf, gguf_dtypes
from ..merge.adapters import merge_adapter_into
from ..model.peft_io import is_adapter_dir

FORMATS = ("hf", "gguf")


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    if stage.format not in FORMATS:
        raise ValueError(f"stage.format={stage.format!r}; choose one of {FORMATS}")
    source = stage.source or cfg.model.init_from
    if not source:
        raise ValueError("stage=export needs a model directory: stage.source=<dir> (or model.init_from=<dir>)")
    out_dir = Path(cfg.output_dir)
    if (Path(source) / DCP_DIR).is_dir():  # a training checkpoint (checkpoints/step-N): its weights first
        source = str(export_checkpoint(source, out_dir / "from_checkpoint"))
    if stage.merge_adapter or is_adapter_dir(source):  # LoRA: fold the adapter(s) into a full checkpoint first
        base, adapter = (source, stage.merge_adapter) if stage.merge_adapter else (None, source)
        source = str(merge_adapter_into(base, adapter, out_dir / "folded"))
    if stage.format == "gguf":
        dtype = stage.dtype or "f16"
        if dtype not in gguf_dtypes():
            raise ValueError(f"stage.dtype={dtype!r} for gguf; choose one of {gguf_dtypes()}")
        target = Path(stage.output) if stage.output else out_dir / f"model-{dtype}.gguf"
        if stage.output_dtype is not None and stage.output_dtype not in gguf_dtypes():
            raise ValueError(f"stage.output_dtype={stage.output_dtype!r} for gguf; choose one of {gguf_dtypes()}")
        summary = export_gguf(source, target, dtype, tokenizer=stage.tokenizer, pre_tokenizer=stage.pre_tokenizer,
                              name=stage.model_name, output_dtype=stage.output_dtype)
    else:
        target = Path(stage.output) if stage.output else out_dir / "model"
        summary = export_hf(source, target, dtype=stage.dtype, check_transformers=stage.check_transformers)
        summary["format"] = "hf"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nexport: {json.dumps(summary, default=str)}")
    return summary
