"""Evaluation: validation loss on token shards, generation tasks with answer extraction, multiple choice
by log-likelihood, and an lm-evaluation-harness adapter. Everything model-facing goes through a `Runner`
(`runner.py`), so a faster inference path can replace the reference one without touching the tasks."""

from .arithmetic import arithmetic_accuracy
from .perplexity import validation_loss
from .runner import RUNNERS, ReferenceRunner, Runner, make_runner

__all__ = ["RUNNERS", "ReferenceRunner", "Runner", "arithmetic_accuracy", "make_runner", "validation_loss"]
