"""GQA attention with per-head QK RMSNorm before RoPE; backends `sdpa` (default), `flash_attn`, `eager`.

All three compute the same function. The backend only changes the kernel, never the math, so a test
can hold each one to the eager reference.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .cache import InferenceCache
from .config import LFM2Config
from .layers import RMSNorm, apply_rotary
from .layout import BatchLayout

_flash_module: ModuleType | None = None


def load_flash_attn() -> ModuleType:
    """Import flash-attn lazily: it is an optional extra (`pip install lfm2_train[gpu]`)."""
    global _flash_module
    if _flash_module is None:
        try:
            _flash_module = importlib.import_module("flash_attn")
        except ImportError as err:
            raise ImportError(
                "attn_implementation='flash_attn' needs the flash-attn package "
                "(pip install 'lfm2_train[gpu]', CUDA only); use 'sdpa' otherwise"
            ) from err
    return _flash_module


class Attention(nn.Module):
    def __init__(self, config: LFM2Config, layer_idx: int) -> None:
        super().__init__()
        d, H, G, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_size
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, D
        self.scale = D**-0.5
        self.backend = config.attn_implementation
        self.q_proj = nn.Linear(d, H * D, bias=False)
        self.k_proj = nn.Linear(d, G * D, bias=False)
        self.v_proj = nn.Linear(d, G * D, bias=False)
        self.out_proj = nn.Linear(H * D, d, bias=False)
        self.q_layernorm = RMSNorm(D, config.norm_eps)
        self.k_layernorm = RMSNorm(D, config.norm_eps)
        if self.backend == "flash_attn":
            load_flash_attn()

    def forward(
        self,
        h: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: BatchLayout,
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        B, T, _ = h.shape
        q = self.q_layernorm(self.q_proj(h).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(h).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H|G, T, D)
        if cache is not None:
            k, v = cache.write_kv(self.layer_idx, k, v)

        if self.backend == "flash_attn" and q.is_cuda:
            out = self._flash(q, k, v, layout)
        elif self.backend == "eager":
            out = self._eager(q, k, v, layout)
        else:
            out = self._sdpa(q, k, v, layout)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))

    # ---------------------------------------------------------------- backends
    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        mask = layout.attention_mask()
        causal = mask is None and layout.needs_causal_only() and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads
        )

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = (q @ k.transpose(-1, -2)) * self.scale  # (B, H, T, S)
        mask = layout.attention_mask()
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return probs @ v

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: BatchLayout) -> torch.Tensor:
        fa = load_flash_attn()
        # flash-attn wants (B, T, heads, D); it handles GQA and bottom-right causal alignment itself.
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if layout.past_length == 0:
            if layout.doc_ids is None:
                out = fa.flash_attn_func(qt, kt, vt, softmax_scale=self.scale, causal=True)
            else:
                B, T = layout.position_ids.shape
                cu, max_len = layout.varlen()
                flat = lambda t: t.reshape(B * T, t.shape[2], t.shape[3])  # noqa: E731
                out = fa.flash_attn_varlen_func(
                    flat(qt), flat(kt), flat(vt), cu, cu, max_len, max_len, softmax_scale=self.scale, causal=True
                ).view(B, T, self.n_heads, self.head_dim)
            return out.transpose(1, 2)
        if layout.key_valid is None or bool(layout.key_valid.all()):
            out = fa.flash_attn_func(qt, kt, vt, softmax_scale=self.scale, causal=True)
            return out.transpose(1, 2)
        # Padded rows in a decode cache: the dense masked kernel is exact and the cost is negligible.
        return self._sdpa(q, k, v, layout)
