"""Shared settings for these tests: the tiny models run fastest (and least noisily when the machine is busy)
on one intra-op thread; the previous thread count is restored after every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
