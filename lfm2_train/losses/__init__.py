"""Training objectives on the LM head. Each returns a *sum* over tokens (plus counts / metric sums), so
callers normalise by the number of tokens in the whole global batch — exact under gradient accumulation
and data parallelism."""

from .cross_entropy import chunked_cross_entropy, lm_loss
from .distill import KDParams, ce_kd_chunk, kd_terms
from .head import fused_head_loss
from .preference import LossTerm, PreferenceLoss, pair_logps, sequence_logps

__all__ = ["KDParams", "LossTerm", "PreferenceLoss", "ce_kd_chunk", "chunked_cross_entropy", "fused_head_loss",
           "kd_terms", "lm_loss", "pair_logps", "sequence_logps"]
