"""Generation and sampling on top of the model's inference cache."""

from .generate import GenerationOutput, generate, left_pad
from .sampling import SamplingConfig, filter_logits, select_next

__all__ = ["GenerationOutput", "SamplingConfig", "filter_logits", "generate", "left_pad", "select_next"]
