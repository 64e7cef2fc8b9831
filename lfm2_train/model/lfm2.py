"""The LFM2 causal LM: embedding -> [conv | attention] layers -> final RMSNorm -> tied LM head.

Module and parameter names equal the Hugging Face checkpoint keys (`model.layers.3.conv.in_proj.weight`),
so the state dict *is* the checkpoint for dense models. The model knows nothing about distribution,
activation checkpointing or compilation; those are applied from outside.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import Attention
from .cache import InferenceCache
from .config import ATTENTION, LFM2Config
from .conv import ShortConv
from .hf_io import _init_runtime_buffers, read_checked_state_dict, read_config, write_checkpoint
from .layers import RMSNorm, RotaryEmbedding, SwiGLU
from .layout import BatchLayout, doc_ids_from_position_ids, position_ids_from_doc_ids
from .moe import Experts, MoEFeedForward

# (target parameter or buffer, its full value on the CPU) -> None: how an initial value reaches storage that
# may be sharded (see `reset_parameters`).
Assign = Callable[[torch.Tensor, torch.Tensor], None]


class DecoderLayer(nn.Module):
    """Pre-norm block: `h += mixer(norm(h)); h += ffn(norm(h))`."""

    def __init__(self, config: LFM2Config, layer_idx: int) -> None:
        super().__init__()
        self.is_attention = config.layer_types[layer_idx] == ATTENTION
        if self.is_attention:
            self.self_attn = Attention(config, layer_idx)
        else:
            self.conv = ShortConv(config, layer_idx)
        self.operator_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if config.is_moe_layer(layer_idx):
            self.feed_forward: nn.Module = MoEFeedForward(config)
        else:
            self.feed_forward = SwiGLU(config.hidden_size, config.ff_dim)

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: BatchLayout,
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        x = self.operator_norm(h)
        h = h + (self.self_attn(x, rope, layout, cache) if self.is_attention else self.conv(x, layout, cache))
        return h + self.feed_forward(self.ffn_norm(h))


class LFM2Model(nn.Module):
    """The backbone (no head): token ids -> final normed hidden states (B, T, d)."""

    def __init__(self, config: LFM2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.embedding_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.rotary = RotaryEmbedding(config.head_size, config.rope_theta)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        layout = self.build_layout(input_ids, position_ids, doc_ids, attention_mask, cache)
        h = self.embed_tokens(input_ids)  # (B, T, d)
        rope = self.rotary(layout.position_ids, h.dtype)
        if cache is not None:
            cache.reserve(input_ids.shape[1])
        for layer in self.layers:
            h = layer(h, rope, layout, cache)
        if cache is not None:
            valid = attention_mask.bool() if attention_mask is not None else None
            cache.advance(input_ids.shape[1], valid)
        return self.embedding_norm(h)

    @staticmethod
    def build_layout(
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: InferenceCache | None,
    ) -> BatchLayout:
        """Normalise the three ways callers describe a batch into one `BatchLayout`.

        - `doc_ids` (B, T): packed documents, negative = padding;
        - `position_ids` restarting at 0 (no cache): packed documents, as most packers emit them;
        - `attention_mask` (B, T) of the *current* tokens, 0 = padding (left padding for generation).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        valid = None
        if attention_mask is not None:
            valid = attention_mask.to(device=dev, dtype=torch.bool)
            if bool(valid.all()):
                valid = None
        if doc_ids is None and cache is None and position_ids is not None:
            derived = doc_ids_from_position_ids(position_ids)
            if bool((derived[:, -1] > 0).any()):
                doc_ids = derived
        if valid is not None:
            doc_ids = torch.where(valid, doc_ids if doc_ids is not None else torch.zeros_like(input_ids), -1)
        if cache is not None and doc_ids is not None and bool((doc_ids.clamp(min=0).amax(1) > 0).any()):
            raise ValueError("packed documents (several doc ids per row) cannot be decoded with a cache")

        if position_ids is None:
            if cache is not None:
                steps = (valid.long().cumsum(1) - 1).clamp(min=0) if valid is not None else torch.arange(T, device=dev)
                position_ids = cache.next_position[:, None] + steps
            elif doc_ids is not None:
                position_ids = position_ids_from_doc_ids(doc_ids)
            else:
                position_ids = torch.arange(T, device=dev).expand(B, T)

        past = cache.length if cache is not None else 0
        key_valid = None
        if cache is not None and (cache.has_padding or valid is not None):
            key_valid = cache.key_valid[:, : past + T].clone()
            key_valid[:, past:] = valid if valid is not None else True
        return BatchLayout(position_ids=position_ids, doc_ids=doc_ids, past_length=past, key_valid=key_valid)


class LFM2ForCausalLM(nn.Module):
    """Backbone + LM head (tied to the embedding by default). `forward` returns logits (B, T, V)."""

    def __init__(self, config: LFM2Config) -> None:
        super().__init__()
        self.config = config
        self.model = LFM2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, assign: Assign | None = None) -> None:
        """Normal(0, initializer_range) for every matrix and the conv taps; ones for norms; zero biases.

        With `assign(target, value)`, every value is first made whole on the CPU (same op, shape and generator
        as the in-place init, so the same numbers) and handed to `assign`, which writes it into `target`
        however `target` is stored — a sharded parameter keeps only its shard. Buffers are recomputed too.
        """
        std = self.config.initializer_range

        def normal(t: torch.Tensor) -> None:
            if assign is None:
                nn.init.normal_(t, 0.0, std)
            else:
                assign(t, torch.empty(t.shape, dtype=torch.float32, device="cpu").normal_(0.0, std))

        def fill(t: torch.Tensor, value: float) -> None:
            if assign is None:
                t.fill_(value)
            else:
                assign(t, torch.full(t.shape, value, dtype=t.dtype, device="cpu"))

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d)):
                normal(module.weight)
                if getattr(module, "bias", None) is not None:
                    fill(module.bias, 0.0)
            elif isinstance(module, RMSNorm):
                fill(module.weight, 1.0)
            elif isinstance(module, Experts):
                for p in (module.w1, module.w3, module.w2):
                    normal(p)
            elif isinstance(module, MoEFeedForward):
                fill(module.expert_bias, 0.0)
                fill(module.expert_load, 0.0)
            elif isinstance(module, RotaryEmbedding) and assign is not None:
                with torch.device("cpu"):
                    assign(module.inv_freq, RotaryEmbedding(self.config.head_size, self.config.rope_theta).inv_freq)
        if self.config.tie_word_embeddings and assign is None:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_like_eager(self, assign: Assign) -> None:
        """Initialise a model built on the meta device (and sharded, materialised) exactly as `LFM2ForCausalLM(
        config)` would have from the same generator state.

        Eager construction lets torch.nn initialise every Linear / Embedding / Conv1d by its own rule before
        `reset_parameters` overwrites them: the values are discarded, but the generator advanced. Those draws
        are replayed, one throw-away CPU module at a time (never more than one layer in memory), then
        `reset_parameters(assign)` runs.
        """
        with torch.device("cpu"):
            for m in self.modules():
                if type(m) is nn.Linear:
                    nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
                elif type(m) is nn.Embedding:
                    nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx)
                elif type(m) is nn.Conv1d:
                    nn.Conv1d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                              dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
        self.reset_parameters(assign)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
        logits_to_keep: int = 0,
        head_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> Any:
        """Logits (B, T, V); with `logits_to_keep=n` only the last n positions (prefill needs one).

        `head_fn(hidden (B, T, d), head_weight (V, d))` replaces the LM head: training losses use it to
        compute logits chunk by chunk (never the full fp32 (B*T, V) tensor). It runs inside `forward`, so
        DDP / FSDP / DeepSpeed wrappers see every parameter used where they expect it.
        """
        h = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids, attention_mask=attention_mask,
                       cache=cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if head_fn is not None:
            return head_fn(h, self.lm_head.weight)
        return self.lm_head(h)

    # ---------------------------------------------------------------- helpers
    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> InferenceCache:
        p = self.model.embed_tokens.weight
        return InferenceCache(self.config, batch_size, max_length, dtype or p.dtype, p.device)

    def num_parameters(self) -> int:
        """Unique parameters (the tied head counted once), buffers excluded — the published totals."""
        return sum(p.numel() for p in self.parameters())

    def moe_layers(self) -> list[MoEFeedForward]:
        return [m for m in self.modules() if isinstance(m, MoEFeedForward)]

    def update_expert_biases(self) -> list[torch.Tensor]:
        """Apply the configured expert-bias rule in every MoE layer; call after each optimizer step."""
        return [m.update_expert_bias() for m in self.moe_layers()]

    # ---------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = torch.float32,
        device: torch.device | str = "cpu",
        attn_implementation: str | None = None,
    ) -> LFM2ForCausalLM:
        """Load a Hugging Face LFM2 / LFM2-MoE directory (ours or `transformers`' or the Hub's).

        `dtype="auto"` keeps the stored dtype.
        """
        config = read_config(path)
        if attn_implementation is not None:
            config = config.replace(attn_implementation=attn_implementation)
        if dtype == "auto":
            dtype = None
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with torch.device("meta"):
            model = cls(config)
        state = read_checked_state_dict(path, config, model.state_dict(), dtype)
        model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        _init_runtime_buffers(model, device)
        return model

    def save_pretrained(self, path: str | Path, *, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | None = None) -> Path:
        """Write config.json, generation_config.json and safetensors weights loadable by `transformers`."""
        return write_checkpoint(self.state_dict(), self.config, path, max_shard_size=max_shard_size, dtype=dtype)


def read_state_dict(path: str | Path, config: LFM2Config, dtype: torch.dtype | None = None
                    ) -> dict[str, torch.Tensor]:
    """Our state dict (tied head included) from a checkpoint directory, checked key by key and shape by shape
    against the model `config` describes (built on the meta device, so nothing is allocated)."""
    with torch.device("meta"):
        reference = LFM2ForCausalLM(config).state_dict()
    return read_checked_state_dict(path, config, reference, dtype)
