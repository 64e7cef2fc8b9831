"""Model FLOPs per trained token, the numerator of MFU.

Counted the way MFU is usually defined (PaLM appendix B): 6 FLOPs per token per *active* weight that a
token multiplies (forward 2, backward 4), plus the attention score and value products. Recomputation
under activation checkpointing is hardware work, not model work, so it is left out on purpose: MFU then
says how much of the GPU went into the model's own arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import LFM2Config, LFM2ForCausalLM
from ..model.config import ATTENTION


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token (forward + backward) and what they come from."""

    matmul: float  # 6 x active weights touched per token (LM head included, embedding lookup excluded)
    attention: float  # 6 x attention layers x heads x head_dim x mean causal span
    active_params: int  # weights one token multiplies (MoE: the routed top-k share of the experts)

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def active_matmul_params(model: LFM2ForCausalLM) -> int:
    """Weights that multiply each token: every matrix and conv tap, the experts scaled by top_k / E, the
    (tied) LM head once; norms and the embedding lookup are not multiplications."""
    cfg: LFM2Config = model.config
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.endswith("embed_tokens.weight") or p.dim() < 2:
            continue  # the lookup is an index; 1-D weights are norms (elementwise, not 6N work)
        if ".experts." in name:
            total += p.numel() * cfg.num_experts_per_tok // cfg.num_experts
        else:
            total += p.numel()
    return total  # a tied head appears here as `lm_head.weight`: one matmul with the embedding matrix


def flops_per_token(model: LFM2ForCausalLM, seq_len: int) -> FlopsPerToken:
    """For rows of `seq_len` tokens of one document each (packing shortens spans; this is the upper bound)."""
    cfg: LFM2Config = model.config
    n_attn = sum(1 for t in cfg.layer_types if t == ATTENTION)
    span = (seq_len + 1) / 2  # mean number of keys a causal query sees
    # QK^T and PV: 2 matmuls x 2 FLOPs x H x D x span in the forward, twice that in the backward.
    attention = 6.0 * 2 * n_attn * cfg.num_attention_heads * cfg.head_size * span
    active = active_matmul_params(model)
    return FlopsPerToken(matmul=6.0 * active, attention=attention, active_params=active)
