"""Deployment formats: Hugging Face directories (`hf`) and llama.cpp GGUF files (`gguf`).

`export_gguf` needs the `gguf` package (a main dependency); this package imports without it.
"""

from __future__ import annotations

from .gguf import GGUFExportError, export_gguf, gguf_dtypes
from .hf import HF_DTYPES, copy_tree, export_hf

__all__ = ["GGUFExportError", "HF_DTYPES", "copy_tree", "export_gguf", "export_hf", "gguf_dtypes"]
