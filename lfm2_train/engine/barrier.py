"""Waiting for the files other ranks write, for a bounded time.

Ranks of a long offline pass (the teacher cache) may finish hours apart, past any collective's timeout, so
the rank that writes the final manifest polls for the others' files instead of meeting them in a
collective. It must not poll forever: a rank that died leaves its file missing, and the job would hang
without a word. After `timeout_s` the wait fails, naming the file, the rank that should write it and how
long it waited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 3600.0


class BarrierTimeout(TimeoutError):
    """Another rank's file did not appear within the barrier's timeout."""


class FileBarrier:
    """Polls, every `poll_s` seconds, until each awaited file is ready; `timeout_s` bounds the whole barrier
    (every wait through this object), from its creation."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, *, poll_s: float = 10.0, label: str = "barrier",
                 hint: str = "") -> None:
        if not timeout_s > 0 or not poll_s > 0:
            raise ValueError(f"a file barrier needs a positive timeout and poll interval, got {timeout_s} / {poll_s}")
        self.timeout_s, self.poll_s, self.label, self.hint = timeout_s, poll_s, label, hint
        self.started = time.monotonic()

    def wait(self, ready: Callable[[], T | None], path: Path, rank: int, what: str | None = None) -> T:
        """`ready()`'s value once it is not None (`path` is the file that makes it so, written by `rank`).

        Raises `BarrierTimeout` once the barrier has waited `timeout_s` in all.
        """
        while (value := ready()) is None:
            waited = time.monotonic() - self.started
            if waited >= self.timeout_s:
                raise BarrierTimeout(
                    f"{self.label}: waited {waited:.1f} s for rank {rank} to write {path}; it did not appear within "
                    f"the timeout of {self.timeout_s:g} s" + (f". {self.hint}" if self.hint else ""))
            print(f"{self.label}: waiting for rank {rank} to finish {what or path.name}")
            time.sleep(min(self.poll_s, self.timeout_s - waited))
        return value
