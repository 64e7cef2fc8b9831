"""Tiny checkpoint directories written with the real exporter (random weights, bundled tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


def write_checkpoint(path: Path, preset: str = "tiny", seed: int = 0, dtype: torch.dtype | None = None,
                     tokenizer: bool = True, **changes) -> Path:
    torch.manual_seed(seed)
    config = get_preset(preset).replace(**changes) if changes else get_preset(preset)
    model = LFM2ForCausalLM(config)
    if config.is_moe:  # a non-trivial routing bias, so the expert_bias policy is observable
        for module in model.modules():
            if hasattr(module, "expert_bias") and module.expert_bias is not None:
                module.expert_bias.copy_(torch.randn_like(module.expert_bias))
    model.save_pretrained(path, dtype=dtype)
    if tokenizer:
        LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(path)
    return path


@pytest.fixture
def make_checkpoint():
    """Factory: make_checkpoint(dir, preset='tiny', seed=0, dtype=None, tokenizer=True, **config changes)."""
    return write_checkpoint
