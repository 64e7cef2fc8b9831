"""QLoRA: the frozen base's linear layers stored 4-bit (NF4 / FP4) or 8-bit through bitsandbytes.

bitsandbytes' k-bit matmuls are CUDA kernels; a CPU run is refused with a message instead of being
emulated, because an emulation would neither save memory nor be the numerics QLoRA is known for. The
quantised layers are bitsandbytes' own `Linear4bit` / `Linear8bitLt` (subclasses of `nn.Linear`), so
`lora.apply_lora` adds adapters to them like to any linear layer and the adapters stay in full precision.
Embedding, norms, the conv taps, MoE experts and the (tied) LM head stay in their original precision.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
from torch import nn

QUANTIZE_KINDS = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class QLoRAUnavailable(RuntimeError):
    """QLoRA was asked for where it cannot run (no CUDA device, or bitsandbytes missing)."""


def check_quantize(kind: str, device: torch.device | str) -> None:
    """Validate `model.lora.quantize` for this device; raises with what to do instead."""
    if kind not in QUANTIZE_KINDS:
        raise ValueError(f"model.lora.quantize={kind!r}; choose one of {QUANTIZE_KINDS}")
    if kind == "none":
        return
    if torch.device(device).type != "cuda":
        raise QLoRAUnavailable(
            f"model.lora.quantize={kind} (QLoRA) needs a CUDA GPU: bitsandbytes' {kind} kernels do not run on "
            f"{torch.device(device).type}. On this machine use model.lora.quantize=none (LoRA on a full-precision "
            "base) — nothing is quantised or emulated on CPU.")
    _bitsandbytes()


def _bitsandbytes() -> ModuleType:
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise QLoRAUnavailable("QLoRA needs bitsandbytes: pip install 'lfm2_train[qlora]'") from err


def quantizable_linears(model: nn.Module) -> list[str]:
    """Linear layers of the decoder stack; the MoE router (`feed_forward.gate`) stays exact."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and ".layers." in f".{name}" and not name.endswith("feed_forward.gate")]


@torch.no_grad()
def quantize_base(model: nn.Module, kind: str, device: torch.device | str, compute_dtype: str = "bfloat16"
                  ) -> list[str]:
    """Replace the decoder's linear layers with bitsandbytes k-bit layers on `device`, in place; -> their names.

    Call before `apply_lora`; the quantised weights are frozen (bitsandbytes cannot train them).
    """
    check_quantize(kind, device)
    if kind == "none":
        return []
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"model.lora.compute_dtype={compute_dtype!r}; choose one of {list(COMPUTE_DTYPES)}")
    bnb = _bitsandbytes()
    names = quantizable_linears(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear: nn.Linear = getattr(parent, child)
        weight = linear.weight.detach().to("cpu", torch.float16 if kind == "int8" else COMPUTE_DTYPES[compute_dtype])
        if kind == "int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=COMPUTE_DTYPES[compute_dtype], quant_type=kind)
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=kind)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        setattr(parent, child, q.to(device))  # bitsandbytes quantises on the move to the GPU
    model.to(device)
    return names
