"""Training objectives. Each returns a *sum* over tokens plus the token count, so callers can normalise by
the number of tokens in the whole global batch (exact under gradient accumulation and data parallelism)."""

from .cross_entropy import chunked_cross_entropy, lm_loss

__all__ = ["chunked_cross_entropy", "lm_loss"]
