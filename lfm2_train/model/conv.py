"""The gated short-convolution mixer: `out_proj(C * conv_k(B * x))` with `(B, C, x) = in_proj(h)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import InferenceCache
from .config import LFM2Config
from .layout import BatchLayout


class ShortConv(nn.Module):
    """Gated depthwise causal convolution of kernel k (3 in every released model).

    Three regimes share the weights:
    - plain: one document per row, `F.conv1d` with left zero padding;
    - masked: packed documents / padding, a sum over k lags where each lag is zeroed when it would
      reach into another document (same numbers as running each document alone);
    - cached: prefill prepends the stored window, decode is a k-term dot product per channel.
    """

    def __init__(self, config: LFM2Config, layer_idx: int) -> None:
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.kernel = config.conv_L_cache
        self.in_proj = nn.Linear(d, 3 * d, bias=config.conv_bias)
        # Stored as (d, 1, k) like the checkpoints' `conv.conv.weight`; applied by hand below.
        self.conv = nn.Conv1d(d, d, kernel_size=self.kernel, groups=d, bias=config.conv_bias)
        self.out_proj = nn.Linear(d, d, bias=config.conv_bias)

    def forward(self, h: torch.Tensor, layout: BatchLayout, cache: InferenceCache | None = None) -> torch.Tensor:
        T = h.shape[1]
        bcx = self.in_proj(h).transpose(1, 2)  # (B, 3d, T)
        b, c, x = bcx.chunk(3, dim=1)  # each (B, d, T)
        y = b * x
        valid = layout.valid_tokens()
        if valid is not None:
            y = y * valid.to(y.dtype)  # padding contributes nothing, now or as cached history
        weight = self.conv.weight[:, 0, :]  # (d, k)
        bias = self.conv.bias

        if cache is not None and layout.past_length > 0 and T == 1:
            z = self._decode_step(y, weight, bias, cache.conv[self.layer_idx])
        else:
            history = cache.conv[self.layer_idx] if cache is not None and layout.past_length > 0 else None
            z = self._conv(y, weight, bias, layout, history)
            if cache is not None:
                self._store_window(y, cache.conv[self.layer_idx])
        return self.out_proj((c * z).transpose(1, 2))

    def _conv(
        self,
        y: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layout: BatchLayout,
        history: torch.Tensor | None,
    ) -> torch.Tensor:
        T, k = y.shape[-1], self.kernel
        masks = layout.conv_history_masks(k)
        if masks is None:
            full = torch.cat([history.to(y.dtype), y], dim=-1) if history is not None else F.pad(y, (k - 1, 0))
            return F.conv1d(full, weight.unsqueeze(1), bias, groups=y.shape[1])[..., -T:]
        # Masked sum over lags: lag l uses weight column k-1-l and the (B, 1, T) same-document mask.
        full = torch.cat([history.to(y.dtype), y], dim=-1) if history is not None else F.pad(y, (k - 1, 0))
        z = y * weight[:, k - 1, None]
        for lag in range(1, k):
            shifted = full[..., k - 1 - lag: k - 1 - lag + T]
            z = z + shifted * weight[:, k - 1 - lag, None] * masks[lag - 1].to(y.dtype)
        if bias is not None:
            z = z + bias[:, None]
        return z

    @staticmethod
    def _decode_step(
        y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor
    ) -> torch.Tensor:
        # y: (B, d, 1); state: (B, d, k-1) holds the previous k-1 values of y, oldest first.
        window = torch.cat([state, y.to(state.dtype)], dim=-1)  # (B, d, k)
        state.copy_(window[..., 1:])
        z = (window.to(y.dtype) * weight).sum(-1, keepdim=True)
        if bias is not None:
            z = z + bias[:, None]
        return z

    def _store_window(self, y: torch.Tensor, state: torch.Tensor) -> None:
        keep = self.kernel - 1
        T = y.shape[-1]
        if T >= keep:
            state.copy_(y[..., T - keep:])
        else:
            state.copy_(torch.cat([state[..., T:], y.to(state.dtype)], dim=-1))
