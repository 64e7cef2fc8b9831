"""QLoRA: refused clearly off CUDA; on a CUDA machine with bitsandbytes, a 4-bit / 8-bit base with LoRA adapters
computes close to the full-precision model and trains only the adapters."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.model.lora import LoRAConfig, apply_lora, lora_state_dict
from lfm2_train.model.qlora import QLoRAUnavailable, check_quantize, quantizable_linears, quantize_base


def test_cpu_refusal_names_the_reason_and_the_alternative() -> None:
    with pytest.raises(QLoRAUnavailable, match=r"needs a CUDA GPU.*model\.lora\.quantize=none"):
        check_quantize("nf4", "cpu")
    with pytest.raises(ValueError, match="choose one of"):
        check_quantize("int4", "cpu")
    check_quantize("none", "cpu")  # plain LoRA: nothing to check


def test_router_and_head_stay_exact() -> None:
    names = quantizable_linears(LFM2ForCausalLM(get_preset("tiny-moe")))
    assert names and not any(n.endswith("feed_forward.gate") or n == "lm_head" for n in names)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="QLoRA runs on CUDA with bitsandbytes")
@pytest.mark.parametrize("kind, tol", [("nf4", 0.5), ("int8", 0.2)])
def test_quantised_base_with_adapters_on_gpu(kind: str, tol: float) -> None:
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny")).cuda()
    x = torch.randint(0, 512, (2, 16), device="cuda")
    with torch.no_grad():
        want = model(x).float()
    quantize_base(model, kind, "cuda", compute_dtype="float32")
    apply_lora(model, LoRAConfig(r=4))
    model.train()
    got = model(x).float()
    assert (got - want).abs().max().item() < tol  # quantisation error only: the adapters start at zero
    got.sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and grads <= set(lora_state_dict(model))
