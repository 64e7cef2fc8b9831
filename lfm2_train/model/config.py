"""`LFM2Config`: one typed description of every LFM2 / LFM2-MoE checkpoint.

The field names follow the Hugging Face `config.json` of the released checkpoints, so a config read
from disk and one built from a preset are the same object, and `to_hf_dict()` writes something that
`transformers` (`Lfm2Config` / `Lfm2MoeConfig`) reads without conversion. Legacy keys written by
LiquidAI's original exporter (`full_attn_idxs`, `block_ff_dim`, `tie_embedding`, `theta`, ...) are
accepted on read and never written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONV = "conv"
ATTENTION = "full_attention"
LAYER_TYPES = (CONV, ATTENTION)
ATTN_BACKENDS = ("sdpa", "flash_attn", "eager")
EXPERT_BIAS_UPDATES = ("sign", "none")


class LFM2ConfigError(ValueError):
    """A config value is invalid; the message names the offending field (and file, when known)."""


@dataclass
class LFM2Config:
    """Architecture of an LFM2 (dense) or LFM2-MoE model.

    Sizes are the *configured* ones: the SwiGLU width actually built is `ff_dim`, which applies the
    `block_auto_adjust_ff_dim` rule to `intermediate_size` exactly as the released checkpoints do.
    """

    vocab_size: int = 65536
    hidden_size: int = 1024
    num_hidden_layers: int = 16
    layer_types: list[str] = field(default_factory=lambda: [CONV] * 16)
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    intermediate_size: int = 6656
    block_auto_adjust_ff_dim: bool = True
    block_multiple_of: int = 256
    block_ffn_dim_multiplier: float | None = 1.0
    conv_L_cache: int = 3  # short-conv kernel size
    conv_bias: bool = False
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-5
    max_position_embeddings: int = 128_000
    tie_word_embeddings: bool = True
    bos_token_id: int = 1
    eos_token_id: int = 7
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # --- mixture of experts (num_experts == 0 means dense) ---
    num_experts: int = 0
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1792
    num_dense_layers: int = 2
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    # Aux-loss-free balancing: after each optimizer step b_i += rate * sign(mean_load - load_i).
    expert_bias_update: str = "sign"
    expert_bias_update_rate: float = 1e-3
    # --- runtime (not architecture) ---
    attn_implementation: str = "sdpa"
    # Keys from a config.json that we do not model; written back unchanged so nothing is lost.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def model_type(self) -> str:
        return "lfm2_moe" if self.is_moe else "lfm2"

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def ff_dim(self) -> int:
        """Width of the dense SwiGLU, after the auto-adjust rule (e.g. 6656 -> 4608)."""
        ff = self.intermediate_size
        if self.block_auto_adjust_ff_dim and not self.is_moe:
            ff = int(2 * ff / 3)
            if self.block_ffn_dim_multiplier is not None:
                ff = int(self.block_ffn_dim_multiplier * ff)
                ff = self.block_multiple_of * math.ceil(ff / self.block_multiple_of)
        return ff

    @property
    def attention_layer_indices(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == ATTENTION]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.is_moe and layer_idx >= self.num_dense_layers

    # ------------------------------------------------------------------ validation
    def validate(self, source: str | None = None) -> None:
        """Raise `LFM2ConfigError` naming the first bad field (and `source`, e.g. a config.json path)."""

        def fail(name: str, why: str) -> None:
            where = f" in {source}" if source else ""
            raise LFM2ConfigError(f"LFM2Config.{name}{where}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "conv_L_cache"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            fail("layer_types", f"has {len(self.layer_types)} entries but num_hidden_layers is "
                                f"{self.num_hidden_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                fail("layer_types", f"entry {i} is {t!r}; expected one of {LAYER_TYPES}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"{self.num_attention_heads} does not divide hidden_size "
                                        f"{self.hidden_size} (set head_dim explicitly)")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", f"{self.num_key_value_heads} does not divide "
                                        f"num_attention_heads {self.num_attention_heads}")
        if self.head_size % 2:
            fail("head_dim", f"RoPE needs an even head size, got {self.head_size}")
        if self.rope_theta <= 0:
            fail("rope_theta", f"must be positive, got {self.rope_theta}")
        if self.norm_eps <= 0:
            fail("norm_eps", f"must be positive, got {self.norm_eps}")
        if self.attn_implementation not in ATTN_BACKENDS:
            fail("attn_implementation", f"{self.attn_implementation!r} is not one of {ATTN_BACKENDS}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                fail(name, f"{value} is outside the vocabulary [0, {self.vocab_size})")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                fail("num_experts_per_tok", f"{self.num_experts_per_tok} must be in [1, num_experts="
                                            f"{self.num_experts}]")
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "must be positive")
            if not 0 <= self.num_dense_layers <= self.num_hidden_layers:
                fail("num_dense_layers", f"{self.num_dense_layers} must be in [0, num_hidden_layers]")
            if self.expert_bias_update not in EXPERT_BIAS_UPDATES:
                fail("expert_bias_update", f"{self.expert_bias_update!r} is not one of "
                                           f"{EXPERT_BIAS_UPDATES}")
        elif self.num_experts < 0:
            fail("num_experts", "must be >= 0 (0 means a dense model)")

    # ------------------------------------------------------------------ (de)serialisation
    def replace(self, **changes: Any) -> LFM2Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> LFM2Config:
        """Build from our own field names (e.g. a Hydra config); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            where = f" in {source}" if source else ""
            raise LFM2ConfigError(f"unknown LFM2Config field(s) {unknown}{where}")
        try:
            return cls(**data)
        except LFM2ConfigError as err:
            if source:
                raise LFM2ConfigError(f"{err} (in {source})") from None
            raise

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The `config.json` content `transformers` expects for this model type.

        `dtype` (e.g. "bfloat16") is the dtype of the weights written beside it; a stale value carried
        over from a loaded config is never written, since `dtype="auto"` loaders trust it.
        """
        out: dict[str, Any] = dict(self.extra)
        if dtype is not None:
            out["dtype"] = dtype
        out.update(
            architectures=["Lfm2MoeForCausalLM" if self.is_moe else "Lfm2ForCausalLM"],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            layer_types=list(self.layer_types),
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            conv_L_cache=self.conv_L_cache,
            conv_bias=self.conv_bias,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            norm_eps=self.norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
            use_cache=True,
        )
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.is_moe:
            out.update(
                moe_intermediate_size=self.moe_intermediate_size,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                num_dense_layers=self.num_dense_layers,
                use_expert_bias=self.use_expert_bias,
                routed_scaling_factor=self.routed_scaling_factor,
                norm_topk_prob=self.norm_topk_prob,
            )
        else:
            out.update(
                block_auto_adjust_ff_dim=self.block_auto_adjust_ff_dim,
                block_multiple_of=self.block_multiple_of,
                block_ffn_dim_multiplier=self.block_ffn_dim_multiplier,
            )
        # Our training-only knobs ride along under a namespaced key that transformers ignores.
        out["lfm2_train"] = {
            "expert_bias_update": self.expert_bias_update,
            "expert_bias_update_rate": self.expert_bias_update_rate,
        }
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str | None = None) -> LFM2Config:
        """Read a Hugging Face `config.json` dict, modern or legacy keys."""
        where = f" in {source}" if source else ""
        data = dict(data)
        model_type = data.pop("model_type", None)
        if model_type not in ("lfm2", "lfm2_moe"):
            raise LFM2ConfigError(
                f"model_type {model_type!r}{where} is not an LFM2 model (expected 'lfm2' or 'lfm2_moe')"
            )
        kw: dict[str, Any] = {}

        def take(name: str, *aliases: str) -> None:
            for key in (name, *aliases):
                if key in data:
                    value = data.pop(key)
                    kw.setdefault(name, value)
            for key in aliases:  # drop redundant legacy duplicates
                data.pop(key, None)

        take("vocab_size")
        take("hidden_size", "block_dim", "conv_dim")
        take("num_hidden_layers", "num_layers")
        take("num_attention_heads", "num_heads")
        take("num_key_value_heads")
        take("head_dim")
        take("intermediate_size", "block_ff_dim")
        take("block_auto_adjust_ff_dim")
        take("block_multiple_of")
        take("block_ffn_dim_multiplier")
        take("conv_L_cache")
        take("conv_bias")
        take("norm_eps", "block_norm_eps")
        take("max_position_embeddings")
        take("tie_word_embeddings", "tie_embedding")
        take("bos_token_id")
        take("eos_token_id")
        take("pad_token_id")
        take("initializer_range")
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "num_dense_layers",
                     "use_expert_bias", "routed_scaling_factor", "norm_topk_prob"):
            take(name)
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]

        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        theta = data.pop("rope_theta", None)
        legacy_theta = data.pop("theta", None)
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") not in ("default", None):
                raise LFM2ConfigError(f"rope_parameters.rope_type {rope['rope_type']!r}{where} is not supported")
            theta = rope.get("rope_theta", theta)
        theta = theta if theta is not None else legacy_theta
        if theta is not None:
            kw["rope_theta"] = float(theta)

        layer_types = data.pop("layer_types", None)
        full_attn_idxs = data.pop("full_attn_idxs", None)
        n_layers = kw.get("num_hidden_layers")
        if layer_types is None:
            if n_layers is None:
                raise LFM2ConfigError(f"config{where} has neither layer_types nor num_hidden_layers")
            # transformers' rule: no full_attn_idxs means every layer is attention.
            idxs = set(full_attn_idxs if full_attn_idxs is not None else range(n_layers))
            layer_types = [ATTENTION if i in idxs else CONV for i in range(n_layers)]
        kw["layer_types"] = list(layer_types)
        kw.setdefault("num_hidden_layers", len(layer_types))
        if model_type == "lfm2_moe":
            kw["block_auto_adjust_ff_dim"] = False
            kw.setdefault("num_experts", 32)
        else:
            kw["num_experts"] = 0

        ours = data.pop("lfm2_train", None) or {}
        for key in ("expert_bias_update", "expert_bias_update_rate"):
            if key in ours:
                kw[key] = ours[key]
        # The weights' dtype is a fact about the tensors, not the architecture: save() writes it afresh.
        for key in ("architectures", "use_cache", "transformers_version", "auto_map", "dtype", "torch_dtype"):
            data.pop(key, None)
        kw["extra"] = data
        try:
            return cls(**kw)
        except LFM2ConfigError as err:
            raise LFM2ConfigError(f"{err}{where}") from None
        except TypeError as err:
            raise LFM2ConfigError(f"bad config{where}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> LFM2Config:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LFM2ConfigError(f"{path} is not valid JSON: {err}") from None
        return cls.from_hf_dict(data, source=str(path))

    def save(self, directory: str | Path, dtype: str | None = None) -> Path:
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_hf_dict(dtype), indent=2, sort_keys=True) + "\n")
        return path
