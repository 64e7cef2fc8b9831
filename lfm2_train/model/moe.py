"""LFM2-MoE feed-forward: sigmoid router, bias-for-selection-only, normalised top-k, no shared expert.

Experts are held as three stacked tensors (E, F, d) / (E, d, F) so the block is a handful of batched
matmuls; the Hugging Face checkpoint stores one `experts.{j}.w1/w3/w2` per expert and `hf_io` converts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LFM2Config


class Experts(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden))

    def forward(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (N, d); expert_idx / weights: (N, k). Tokens are grouped by expert, then scattered back."""
        N, k = expert_idx.shape
        flat_expert = expert_idx.flatten()  # (N*k,)
        order = flat_expert.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat_expert, minlength=self.w1.shape[0]).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = order[start:start + n]
            tokens = token_of[start:start + n]
            xe = x[tokens]
            ye = F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e])
            out.index_add_(0, tokens, ye * weights.flatten()[rows, None].to(ye.dtype))
            start += n
        return out


class MoEFeedForward(nn.Module):
    expert_bias: torch.Tensor
    expert_load: torch.Tensor

    def __init__(self, config: LFM2Config) -> None:
        super().__init__()
        d, E = config.hidden_size, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.use_expert_bias = config.use_expert_bias
        self.bias_update = config.expert_bias_update
        self.bias_update_rate = config.expert_bias_update_rate
        self.gate = nn.Linear(d, E, bias=False)
        self.experts = Experts(E, d, config.moe_intermediate_size)
        # fp32 buffers: the bias is saved with the checkpoint; the load counter is training bookkeeping.
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32), persistent=config.use_expert_bias)
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, d) -> (scores (N, E), chosen experts (N, k), combine weights (N, k))."""
        scores = torch.sigmoid(self.gate(x))
        if self.use_expert_bias:
            chosen = torch.topk(scores + self.expert_bias, self.top_k, dim=-1).indices
            weights = scores.gather(-1, chosen).type_as(scores)
        else:
            weights, chosen = torch.topk(scores, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
        return scores, chosen, weights * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        _, chosen, weights = self.route(flat)
        if self.training and torch.is_grad_enabled():  # only training steps drive the bias update
            with torch.no_grad():
                self.expert_load += torch.bincount(chosen.flatten(), minlength=self.expert_load.numel()).float()
        return self.experts(flat, chosen, weights).view(B, T, d)

    @torch.no_grad()
    def update_expert_bias(self) -> torch.Tensor:
        """Aux-loss-free balancing, once per optimizer step: `b_i += rate * sign(mean_load - load_i)`.

        Returns the load that drove the update (then resets it). Under data parallelism the caller
        all-reduces `expert_load` first so every rank applies the same update.
        """
        load = self.expert_load.clone()
        if self.use_expert_bias and self.bias_update == "sign":  # no update without load; decided on the device
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load) * (load.sum() > 0)
        self.expert_load.zero_()
        return load
