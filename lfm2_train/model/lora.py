"""LoRA adapters attached to a built model from outside, with PEFT's names, init and scaling.

The model classes know nothing about adapters. `apply_lora` turns each targeted `nn.Linear` /
`nn.Embedding` *instance* into a LoRA subclass of its own type (the instance keeps its parameters, so base
keys stay `model.layers.3.conv.in_proj.weight` — the Hugging Face checkpoint keys) and adds

    Linear:     lora_A (r x in), lora_B (out x r):   y = W x + s * B A dropout(x)
    Embedding:  lora_embedding_A (r x V), lora_embedding_B (d x r):   e = W[i] + s * (A^T[i]) B^T

with s = lora_alpha / r (or lora_alpha / sqrt(r) with `use_rslora`). Our adapter state-dict keys are then
PEFT's saved keys minus its `base_model.model.` prefix (`model.layers.3.conv.in_proj.lora_A.weight`), which is
what makes the adapter files interchangeable with `peft` on a `transformers` Lfm2 model (`peft_io.py`).
Subclassing the instance (instead of wrapping it in a `base_layer`) also keeps activation checkpointing,
torch.compile and FSDP2, which are applied later per decoder layer, unaware of LoRA.

Base weights are frozen; only adapter parameters require gradients, so the optimizer, the gradient
all-reduce and the checkpoints see only them. `disable_adapters` gives the base model back without a copy
(the preference stage's reference); `fold_lora` adds the deltas into the base weights and removes the
adapters (merge-and-unload).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Every linear layer of an LFM2 decoder layer: attention q/k/v/out, conv in/out projections, SwiGLU w1/w2/w3.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3")
INIT_OPTIONS = (True, False, "gaussian")
# PEFT adapter_config.json fields we cannot honour: a file using them is refused rather than misread.
_UNSUPPORTED_PEFT = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                     "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                     "target_parameters": None, "trainable_token_indices": None, "layer_replication": None,
                     "exclude_modules": None, "use_qalora": False, "alora_invocation_tokens": None}


class LoRAError(ValueError):
    """A LoRA configuration or adapter that cannot be applied to this model; the message names the part."""


@dataclass
class LoRAConfig:
    """The adapter's hyper-parameters, named and defaulted as in `peft.LoraConfig` where PEFT has them."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    base_model_name_or_path: str | None = None  # the directory the adapter was trained on (recorded, not read)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise LoRAError(f"LoRA rank r={self.r!r} must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LoRAError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if isinstance(self.init_lora_weights, str) and self.init_lora_weights.lower() in ("true", "false"):
            self.init_lora_weights = self.init_lora_weights.lower() == "true"
        if self.init_lora_weights not in INIT_OPTIONS:
            raise LoRAError(f"init_lora_weights={self.init_lora_weights!r}; supported: {list(INIT_OPTIONS)} "
                            "(PEFT's data-driven inits such as pissa / olora / loftq are not implemented)")
        if not isinstance(self.target_modules, str):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise LoRAError("target_modules is empty: name at least one module (e.g. q_proj) or 'all-linear'")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self) -> dict[str, Any]:
        """adapter_config.json contents that `peft.PeftConfig.from_pretrained` reads as this adapter."""
        targets = self.target_modules if isinstance(self.target_modules, str) else sorted(self.target_modules)
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
                "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": targets, "use_rslora": self.use_rslora,
                "init_lora_weights": self.init_lora_weights, "inference_mode": True, **_UNSUPPORTED_PEFT}

    @classmethod
    def from_peft_dict(cls, raw: dict[str, Any], source: str = "adapter_config.json") -> LoRAConfig:
        """Read PEFT's adapter_config.json; options this implementation does not support are named and refused."""
        if raw.get("peft_type", "LORA") != "LORA":
            raise LoRAError(f"{source}: peft_type={raw.get('peft_type')!r}; only LORA adapters are supported")
        for key, neutral in _UNSUPPORTED_PEFT.items():
            value = raw.get(key, neutral)
            if value not in (neutral, None) and not (isinstance(neutral, dict) and not value):
                raise LoRAError(f"{source}: {key}={value!r} is not supported (only plain LoRA on Linear / Embedding)")
        targets = raw.get("target_modules")
        if targets is None:
            raise LoRAError(f"{source}: target_modules is missing")
        init = raw.get("init_lora_weights", True)
        return cls(r=int(raw["r"]), lora_alpha=float(raw.get("lora_alpha", 8)),
                   lora_dropout=float(raw.get("lora_dropout", 0.0)),
                   target_modules=targets if isinstance(targets, str) else list(targets),
                   use_rslora=bool(raw.get("use_rslora", False)),
                   init_lora_weights=init if init in INIT_OPTIONS else True,  # the init does not matter once trained
                   base_model_name_or_path=raw.get("base_model_name_or_path"))


# ---------------------------------------------------------------------------------------------- modules
class _LoRALinearMixin:
    """Added in front of a linear class (nn.Linear, or a bitsandbytes quantised linear for QLoRA)."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_scaling: float
    lora_dropout_p: float
    lora_disabled: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)  # type: ignore[misc]
        if self.lora_disabled:
            return out
        h = F.dropout(x, self.lora_dropout_p, self.training) if self.lora_dropout_p else x  # type: ignore[attr-defined]
        h = h.to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(h)) * self.lora_scaling).to(out.dtype)


class LoRALinear(_LoRALinearMixin, nn.Linear):
    pass


class LoRAEmbedding(nn.Embedding):
    lora_embedding_A: nn.Parameter  # (r, V)
    lora_embedding_B: nn.Parameter  # (d, r)
    lora_scaling: float
    lora_disabled: bool

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = super().forward(input)
        if self.lora_disabled:
            return out
        after_a = F.embedding(input, self.lora_embedding_A.t(), self.padding_idx)  # (..., r)
        return out + (after_a @ self.lora_embedding_B.t() * self.lora_scaling).to(out.dtype)


_LINEAR_CLASSES: dict[type, type] = {nn.Linear: LoRALinear}


def _lora_class(base: type) -> type:
    """The LoRA subclass of a linear class (made once per class, e.g. for bitsandbytes' Linear4bit)."""
    if base not in _LINEAR_CLASSES:
        _LINEAR_CLASSES[base] = type(f"LoRA{base.__name__}", (_LoRALinearMixin, base), {})
    return _LINEAR_CLASSES[base]


def is_lora_module(module: nn.Module) -> bool:
    return isinstance(module, (_LoRALinearMixin, LoRAEmbedding))


def lora_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if is_lora_module(module):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def is_lora_key(key: str) -> bool:
    """An adapter tensor's state-dict key (ours or PEFT's)."""
    return bool(re.search(r"\.lora_(A|B)\.weight$|\.lora_embedding_(A|B)$", key))


# ---------------------------------------------------------------------------------------------- targets
def _matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex the full module name must match; a list holds module names
    that a module name equals or ends with after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def target_module_names(model: nn.Module, targets: list[str] | str) -> list[str]:
    """Names of the modules `targets` selects; 'all-linear' = every linear layer but the LM head."""
    all_linear = targets == "all-linear" or (isinstance(targets, list) and targets == ["all-linear"])
    out = []
    for name, module in model.named_modules():
        if not name or is_lora_module(module):
            continue
        linear = isinstance(module, nn.Linear)  # bitsandbytes' quantised linears subclass it
        if all_linear:
            if linear and name != "lm_head":
                out.append(name)
            continue
        if not _matches(name, targets):
            continue
        if not (linear or isinstance(module, nn.Embedding)):
            raise LoRAError(f"LoRA target {name} is a {type(module).__name__}; only linear layers and the token "
                            "embedding can carry adapters")
        out.append(name)
    if not out:
        raise LoRAError(f"target_modules={targets!r} matches no module of the model (names like "
                        "model.layers.0.conv.in_proj / self_attn.q_proj / feed_forward.w1 / model.embed_tokens)")
    return out


def _is_quantized_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


# ---------------------------------------------------------------------------------------------- apply
def apply_lora(model: nn.Module, config: LoRAConfig, generator: torch.Generator | None = None) -> list[str]:
    """Add adapters to every targeted module in place and freeze everything else; -> the adapted names.

    Init as PEFT: `True` = A kaiming-uniform, B zero (the model's function is unchanged); `"gaussian"` =
    A ~ N(0, 1/r), B zero; embeddings: A zero, B ~ N(0, 1); `False` = both random (a non-identity adapter,
    for tests). `generator` makes the init independent of the global RNG stream.
    """
    if has_lora(model):
        raise LoRAError("the model already carries LoRA adapters; fold them first (fold_lora) to stack another")
    names = target_module_names(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        module = model.get_submodule(name)
        weight = module.weight
        device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # quantised bases: fp32 adapters
        if isinstance(module, nn.Embedding):
            module.__class__ = LoRAEmbedding
            module.lora_embedding_A = nn.Parameter(torch.zeros(config.r, module.num_embeddings, device=device,
                                                               dtype=dtype))
            module.lora_embedding_B = nn.Parameter(torch.zeros(module.embedding_dim, config.r, device=device,
                                                               dtype=dtype))
            _init_embedding(module, config.init_lora_weights, generator)
        else:
            module.__class__ = _lora_class(type(module))
            module.lora_A = nn.Linear(module.in_features, config.r, bias=False, device=device, dtype=dtype)
            module.lora_B = nn.Linear(config.r, module.out_features, bias=False, device=device, dtype=dtype)
            module.lora_dropout_p = config.lora_dropout
            _init_linear(module, config.init_lora_weights, config.r, generator)
        module.lora_scaling = config.scaling
        module.lora_disabled = False
    return names


def _normal(t: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float32).mul_(std).to(t))


@torch.no_grad()
def _init_linear(module: nn.Module, init: bool | str, r: int, generator: torch.Generator | None) -> None:
    a, b = module.lora_A.weight, module.lora_B.weight
    if init is True or init is False:
        # nn.init.kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as nn.Linear and PEFT
        bound = 1.0 / math.sqrt(a.shape[1])
        a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1).mul_(bound).to(a))
    else:  # gaussian
        _normal(a, 1.0 / r, generator)
    if init is False:
        bound = 1.0 / math.sqrt(b.shape[1])
        b.copy_((torch.rand(b.shape, generator=generator) * 2 - 1).mul_(bound).to(b))
    else:
        b.zero_()


@torch.no_grad()
def _init_embedding(module: LoRAEmbedding, init: bool | str, generator: torch.Generator | None) -> None:
    _normal(module.lora_embedding_B, 1.0, generator)
    if init is False:
        _normal(module.lora_embedding_A, 1.0, generator)
    else:
        module.lora_embedding_A.zero_()


# ---------------------------------------------------------------------------------------------- state
def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, under our keys (PEFT's keys minus `base_model.model.`)."""
    return {k: v for k, v in model.state_dict().items() if is_lora_key(k)}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy adapter tensors into the model's adapters; every adapter must be covered, shapes must agree."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise LoRAError(f"{source} does not fit the model's adapters: missing {missing[:6]}"
                        f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                        f"{' ...' if len(unexpected) > 6 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise LoRAError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model's adapter "
                            f"{tuple(own[key].shape)} (another rank or base model?)")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor.to(params[key].dtype))


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """The base model's function (adapters skipped) for the duration; no copy of any weight."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.lora_disabled for m in modules]
    for m in modules:
        m.lora_disabled = True
    try:
        yield model
    finally:
        for m, p in zip(modules, previous):
            m.lora_disabled = p


# ---------------------------------------------------------------------------------------------- fold
def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, embedding: bool) -> torch.Tensor:
    """The weight update an adapter stands for, in fp32: s * B @ A (linear, (out, in)) or its transpose
    for an embedding ((V, d) from A (r, V), B (d, r))."""
    delta = (b.float() @ a.float()) * scaling
    return delta.t() if embedding else delta


@torch.no_grad()
def fold_lora(model: nn.Module) -> nn.Module:
    """Add every adapter's delta into its base weight and remove the adapters (PEFT's merge_and_unload).

    An adapted embedding that the LM head shares (tied) is untied first: PEFT's unmerged model applies the
    adapter to the lookup only, so the head keeps the base matrix and `config.tie_word_embeddings` turns off.
    """
    for name, module in list(lora_modules(model)):
        if _is_quantized_linear(module):
            raise LoRAError(f"{name}: cannot fold an adapter into a quantised (QLoRA) base in memory; fold it into "
                            "the full-precision checkpoint with merge_adapter_into")
        if isinstance(module, LoRAEmbedding):
            head = getattr(model, "lm_head", None)
            if head is not None and head.weight is module.weight:
                head.weight = nn.Parameter(module.weight.detach().clone(), requires_grad=False)
                if hasattr(model, "config"):
                    model.config = model.config.replace(tie_word_embeddings=False)
                    if hasattr(model, "model"):
                        model.model.config = model.config
            delta = lora_delta(module.lora_embedding_A, module.lora_embedding_B, module.lora_scaling, True)
            module.weight.add_(delta.to(module.weight.dtype))
            del module.lora_embedding_A, module.lora_embedding_B
            module.__class__ = nn.Embedding
        else:
            delta = lora_delta(module.lora_A.weight, module.lora_B.weight, module.lora_scaling, False)
            module.weight.add_(delta.to(module.weight.dtype))
            del module.lora_A, module.lora_B
            module.__class__ = next(c for c in type(module).__mro__[1:] if c is not _LoRALinearMixin)
        for attr in ("lora_scaling", "lora_disabled", "lora_dropout_p"):
            module.__dict__.pop(attr, None)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values())
