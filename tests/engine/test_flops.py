"""Model FLOPs per token against torch's FLOP counter on a real forward + backward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lfm2_train.engine.flops import active_matmul_params, flops_per_token
from lfm2_train.losses import lm_loss
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.model.config import LFM2Config


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_flops_per_token_matches_torch_flop_counter(preset):
    torch.manual_seed(0)
    config = LFM2Config.from_dict(get_preset(preset).to_dict())
    model = LFM2ForCausalLM(config)
    B, T = 2, 64
    ids = torch.randint(0, config.vocab_size, (B, T + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}  # one document per row: plain causal attention
    with FlopCounterMode(display=False) as counter:
        loss, _ = lm_loss(model, batch)
        loss.backward()
    per_token = flops_per_token(model, T)
    counted = counter.get_flop_counts()["Global"]
    assert set(counted) == {torch.ops.aten.mm}  # on CPU the counter sees the matmuls only
    # What it cannot see: the fused head's in-place weight-gradient `addmm_` (2 V d per token) and the
    # depthwise conv taps (6 per tap); both are real work that `matmul` includes.
    head = 2 * config.vocab_size * config.hidden_size
    taps = 6 * sum(p.numel() for n, p in model.named_parameters() if n.endswith("conv.conv.weight"))
    assert counted[torch.ops.aten.mm] / (B * T) + head + taps == pytest.approx(per_token.matmul, rel=1e-6)


def test_attention_flops_are_twelve_h_d_times_the_mean_causal_span():
    config = LFM2Config.from_dict(get_preset("lfm2-350m").to_dict())
    with torch.device("meta"):
        model = LFM2ForCausalLM(config)
    n_attn = 6  # layers 2, 5, 8, 10, 12, 14
    per_token = flops_per_token(model, 4096)
    assert per_token.attention == 12 * n_attn * config.num_attention_heads * config.head_size * 4097 / 2
    assert per_token.total == per_token.matmul + per_token.attention


def test_moe_counts_only_the_routed_share_of_the_experts():
    config = LFM2Config.from_dict(get_preset("lfm2-8b-a1b").to_dict())
    with torch.device("meta"):
        model = LFM2ForCausalLM(config)
    active = active_matmul_params(model)
    assert 1.0e9 < active < 2.0e9 < model.num_parameters()  # "A1B": ~1.5B active of 8.3B
