"""Fixtures shared by the tokenize-job tests."""

from __future__ import annotations

import pytest

from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


@pytest.fixture(scope="module")
def tok() -> LFM2Tokenizer:
    return LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A private `datasets` cache, so tests never share (or pollute) the user's."""
    return str(tmp_path_factory.mktemp("hf_cache"))
