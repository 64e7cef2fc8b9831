"""Verifiable tasks shared by SFT (difficulty, data), preference building (the judge) and evaluation."""

from .arithmetic import ArithmeticProblem, extract_answer, make_problems, sft_conversations, verify

__all__ = ["ArithmeticProblem", "extract_answer", "make_problems", "sft_conversations", "verify"]
