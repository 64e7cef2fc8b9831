"""The whole pipeline as one resumable run: a chain file lists stages and data jobs that feed each other
through their output directories (see `spec.py` for the file format, `runner.py` for skip / resume)."""

from .runner import ChainInterrupted, ChainRunner, StepRecord
from .spec import ChainSpec, ChainSpecError, Step, load_chain

__all__ = ["ChainInterrupted", "ChainRunner", "ChainSpec", "ChainSpecError", "Step", "StepRecord", "load_chain"]
