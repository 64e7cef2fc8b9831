"""Tiny HF checkpoint directories with every weight random (norms and routing bias included), so that a
swapped, transposed or mis-named tensor changes values; sized so greedy decoding has clear margins."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


def write_model_dir(path: Path, preset: str = "tiny", seed: int = 0, **changes) -> Path:
    torch.manual_seed(seed)
    config = get_preset(preset).replace(**changes) if changes else get_preset(preset)
    model = LFM2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn_like(p))
            else:  # (out, in) or experts (E, out, in) or the conv kernel (d, 1, k)
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1] if p.ndim != 3 or p.shape[1] != 1 else 4))
        for module in model.modules():
            if getattr(module, "use_expert_bias", False):
                module.expert_bias.copy_(0.5 * torch.randn_like(module.expert_bias))
    model.save_pretrained(path)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("dense") / "tiny-dense")


@pytest.fixture(scope="session")
def moe_dir(tmp_path_factory) -> Path:
    return write_model_dir(tmp_path_factory.mktemp("moe") / "tiny-moe", preset="tiny_moe", seed=1)


@pytest.fixture(params=["dense", "moe"])
def model_dir(request, dense_dir, moe_dir) -> Path:
    return dense_dir if request.param == "dense" else moe_dir
