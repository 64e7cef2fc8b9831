"""Generation and sampling on top of the model's inference cache, and the fast CPU path (`fast.py`)."""

from .decoding import GenerationOutput, left_pad
from .fast import FastLFM2
from .generate import generate
from .sampling import SamplingConfig, filter_logits, select_next

__all__ = ["FastLFM2", "GenerationOutput", "SamplingConfig", "filter_logits", "generate", "left_pad", "select_next"]
