"""Shared fixtures: small token-shard datasets written with the real format, and offline switches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The content-addressed caches (bundled corpus shards, chat shards, reference log-probs) go to a directory of this
# run, shared by its tests and their subprocesses, never to the user's ~/.cache/lfm2_train; a test that needs its
# own sets LFM2_TRAIN_CACHE itself. The compiled kernels keep their own cache (LFM2_KERNEL_CACHE).
if "LFM2_TRAIN_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _CACHE = tempfile.mkdtemp(prefix="lfm2_train_test_cache-")
    os.environ["LFM2_TRAIN_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

# Tiny models are latency-bound: one intra-op thread is faster than two and does not oversubscribe the
# CI machine when subprocess tests run beside the main process.
torch.set_num_threads(1)


def write_text_dataset(out: Path, texts: list[str], shard_tokens: int = 4000) -> Path:
    """Tokenize `texts` with the bundled tiny tokenizer into a dataset directory (format.py layout)."""
    from lfm2_train.data.format import Manifest, write_shard
    from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

    out.mkdir(parents=True, exist_ok=True)
    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    shards, toks, offs = [], [], [0]
    for text in texts:
        toks += tok.encode(text) + [tok.eod_token_id]
        offs.append(len(toks))
        if len(toks) >= shard_tokens:
            shards.append(write_shard(out, f"shard-{len(shards):05d}", np.array(toks, np.uint16), np.array(offs)))
            toks, offs = [], [0]
    if toks:
        shards.append(write_shard(out, f"shard-{len(shards):05d}", np.array(toks, np.uint16), np.array(offs)))
    Manifest(tok.fingerprint(), tok.vocab_size, "uint16", tok.eod_token_id, shards).save(out)
    tok.save_pretrained(out / "tokenizer")
    return out


def arithmetic_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        out.append(f"{a} + {b} = {a + b}. The fox jumps over {a} lazy dogs.")
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text_dataset(tmp_path_factory.mktemp("tiny_dataset"), arithmetic_texts(400))


@pytest.fixture
def make_dataset():
    """Factory: make_dataset(dir, texts, shard_tokens=4000) -> dataset dir."""
    return write_text_dataset


@pytest.fixture
def make_texts():
    return arithmetic_texts


@pytest.fixture
def reference_loads(monkeypatch) -> dict[str, int]:
    """Counts how often the preference stage builds pi_ref (a cache hit must not build it at all)."""
    from lfm2_train.data import ref_logps

    calls = {"n": 0}
    real = ref_logps.load_reference_model

    def counting(path, device="cpu"):
        calls["n"] += 1
        return real(path, device)

    monkeypatch.setattr(ref_logps, "load_reference_model", counting)
    return calls
