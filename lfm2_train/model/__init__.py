"""The LFM2 backbone: config and presets, the model, its inference cache, Hugging Face checkpoint I/O."""

from .cache import InferenceCache
from .config import ATTENTION, CONV, LFM2Config, LFM2ConfigError
from .hf_io import CheckpointError
from .layout import BatchLayout, doc_ids_from_position_ids, position_ids_from_doc_ids
from .lfm2 import LFM2ForCausalLM, LFM2Model
from .presets import PRESETS, PUBLISHED_PARAMS, get_preset

__all__ = [
    "ATTENTION",
    "CONV",
    "PRESETS",
    "PUBLISHED_PARAMS",
    "BatchLayout",
    "CheckpointError",
    "InferenceCache",
    "LFM2Config",
    "LFM2ConfigError",
    "LFM2ForCausalLM",
    "LFM2Model",
    "doc_ids_from_position_ids",
    "get_preset",
    "position_ids_from_doc_ids",
]
