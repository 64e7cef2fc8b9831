"""Named architectures: the released LFM2 sizes and tiny configs for tests and the quick start.

Published totals (tied embeddings) are in `PUBLISHED_PARAMS`; a test builds every preset on the meta
device and checks the count exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from .config import ATTENTION, CONV, LFM2Config, LFM2ConfigError


def _layout(n_layers: int, attention: list[int] | set[int]) -> list[str]:
    attention = set(attention)
    return [ATTENTION if i in attention else CONV for i in range(n_layers)]


_DENSE_ATTN = [2, 5, 8, 10, 12, 14]


def lfm2_350m() -> LFM2Config:
    return LFM2Config(hidden_size=1024, num_hidden_layers=16, layer_types=_layout(16, _DENSE_ATTN),
                      num_attention_heads=16, num_key_value_heads=8, intermediate_size=6656)


def lfm2_700m() -> LFM2Config:
    return LFM2Config(hidden_size=1536, num_hidden_layers=16, layer_types=_layout(16, _DENSE_ATTN),
                      num_attention_heads=24, num_key_value_heads=8, intermediate_size=10240)


def lfm2_1_2b() -> LFM2Config:
    return LFM2Config(hidden_size=2048, num_hidden_layers=16, layer_types=_layout(16, _DENSE_ATTN),
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=12288)


def lfm2_2_6b() -> LFM2Config:
    return LFM2Config(hidden_size=2048, num_hidden_layers=30,
                      layer_types=_layout(30, [2, 5, 9, 13, 17, 21, 24, 27]),
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=10752,
                      block_auto_adjust_ff_dim=False)


def lfm2_8b_a1b() -> LFM2Config:
    return LFM2Config(hidden_size=2048, num_hidden_layers=24,
                      layer_types=_layout(24, [2, 6, 10, 14, 18, 21]),
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=7168,
                      block_auto_adjust_ff_dim=False, num_experts=32, num_experts_per_tok=4,
                      moe_intermediate_size=1792, num_dense_layers=2)


def lfm2_24b_a2b() -> LFM2Config:
    return LFM2Config(hidden_size=2048, num_hidden_layers=40,
                      layer_types=_layout(40, [i for i in range(40) if i % 4 == 2]),
                      num_attention_heads=32, num_key_value_heads=8, intermediate_size=11776,
                      block_auto_adjust_ff_dim=False, num_experts=64, num_experts_per_tok=4,
                      moe_intermediate_size=1536, num_dense_layers=2)


def tiny() -> LFM2Config:
    """Dense test model: 4 layers (attention at 1 and 3), d=64, 512-token vocab (the bundled tokenizer)."""
    return LFM2Config(vocab_size=512, hidden_size=64, num_hidden_layers=4,
                      layer_types=_layout(4, [1, 3]), num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=192, max_position_embeddings=2048)


def tiny_moe() -> LFM2Config:
    """MoE test model: 4 layers, first dense, 4 experts top-2."""
    return LFM2Config(vocab_size=512, hidden_size=64, num_hidden_layers=4,
                      layer_types=_layout(4, [1, 3]), num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, block_auto_adjust_ff_dim=False, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, num_dense_layers=1,
                      max_position_embeddings=2048)


PRESETS: dict[str, Callable[[], LFM2Config]] = {
    "lfm2-350m": lfm2_350m,
    "lfm2-700m": lfm2_700m,
    "lfm2-1.2b": lfm2_1_2b,
    "lfm2-2.6b": lfm2_2_6b,
    "lfm2-8b-a1b": lfm2_8b_a1b,
    "lfm2-24b-a2b": lfm2_24b_a2b,
    "tiny": tiny,
    "tiny-moe": tiny_moe,
}

# Totals from the released checkpoints (tied embeddings, expert-bias buffers not counted).
# LFM2-24B-A2B is published only as "24B"; its exact total is what its config implies.
PUBLISHED_PARAMS: dict[str, int] = {
    "lfm2-350m": 354_483_968,
    "lfm2-700m": 742_489_344,
    "lfm2-1.2b": 1_170_340_608,
    "lfm2-2.6b": 2_569_272_320,
    "lfm2-8b-a1b": 8_339_929_856,
}


def get_preset(name: str) -> LFM2Config:
    key = name.lower().replace("_", "-")
    if key not in PRESETS:
        raise LFM2ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]()
