"""On-disk cache of the reference model's log-probs for a list of preference pairs.

    ref_logps.f32     (pairs, 2) raw little-endian float32: summed completion log-probs [chosen, rejected]
    ref_logps.json    what they were computed from (written last, atomically), with the array's sha256

The cache is keyed by (a) the sha256 of the *tokenised* pairs in order (`preference.pairs_hash`), (b) the
tokenizer fingerprint and (c) the reference's identity: a sha256 over its config.json and weight files.
All three are computed without building the reference model, so a run whose key matches a cache never
constructs it (pi_ref is read from disk once per data set, not once per run).

Where: `directory=None` means a content-addressed directory `$LFM2_TRAIN_CACHE/ref_logps/<key hash>`
(default `~/.cache/lfm2_train`): a change of data, tokenizer or reference weights is a new key, so it is
recomputed into a new directory and never read stale. An explicit directory holds one cache: a different
key there is refused (naming what changed) unless `overwrite=True`, which recomputes it in place —
the same policy as the teacher cache (`teacher_cache.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import (
    DataFormatError,
    adapter_sha256,
    cache_root,
    checkpoint_sha256,
    describe_differences,
    read_manifest,
    sha256_file,
    sha256_json,
    write_array_atomic,
    write_json_atomic,
)
from .preference import EncodedPair, collate_pairs

REF_FORMAT = "lfm2_train.ref_logps/1"
REF_MANIFEST = "ref_logps.json"
REF_ARRAY = "ref_logps.f32"
COMPUTE_VERSION = 1  # bump when the way log-probs are computed changes


class StaleCacheError(DataFormatError):
    """The directory holds a cache for other data / tokenizer / reference weights."""


def reference_weights_sha256(path: str | Path) -> str:
    """The reference model's identity (`artifacts.checkpoint_sha256`: config.json and weight files, robust to
    moving the directory). A PEFT adapter directory (a model = base + adapter) hashes its adapter files
    together with its base's hash."""
    from ..model.peft_io import adapter_base, is_adapter_dir

    if is_adapter_dir(path):
        return adapter_sha256(path, base_sha256=reference_weights_sha256(adapter_base(path)))
    return checkpoint_sha256(path)


def cache_key(data_hash: str, tokenizer_fingerprint: str, reference_sha256: str) -> dict[str, Any]:
    return {"data_hash": data_hash, "tokenizer_fingerprint": tokenizer_fingerprint,
            "reference_weights_sha256": reference_sha256, "compute_version": COMPUTE_VERSION}


def key_digest(key: dict[str, Any]) -> str:
    return sha256_json(key)


def default_cache_dir(key: dict[str, Any]) -> Path:
    return cache_root() / "ref_logps" / key_digest(key)[:20]


def read_cache(directory: str | Path, key: dict[str, Any], n_pairs: int) -> np.ndarray | None:
    """The cached (n_pairs, 2) array when `directory` holds a complete cache for `key`; None when it holds
    no cache; DataFormatError when it holds one for another key or a damaged one."""
    directory = Path(directory)
    manifest = read_manifest(directory / REF_MANIFEST, format=REF_FORMAT)
    if manifest is None:
        return None
    if manifest.get("key") != key:
        raise StaleCacheError(f"reference log-prob cache {directory} was computed for other inputs "
                              f"({describe_differences(manifest.get('key', {}), key)})")
    array_path = directory / REF_ARRAY
    if not array_path.is_file() or sha256_file(array_path) != manifest.get("sha256"):
        raise DataFormatError(f"reference log-prob cache file {array_path} is missing or does not match its sha256")
    values = np.fromfile(array_path, dtype="<f4")
    if values.size != 2 * n_pairs or not np.isfinite(values).all():
        raise DataFormatError(f"{array_path} holds {values.size} values, expected {2 * n_pairs} finite ones")
    values = values.reshape(n_pairs, 2)
    return values


def write_cache(directory: str | Path, key: dict[str, Any], values: np.ndarray, meta: dict[str, Any]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / REF_MANIFEST).unlink(missing_ok=True)  # the manifest is the "complete" marker: drop it first
    write_array_atomic(directory / REF_ARRAY, np.asarray(values, dtype="<f4"))
    manifest = {"format": REF_FORMAT, "key": key, "n_pairs": int(values.shape[0]),
                "sha256": sha256_file(directory / REF_ARRAY), "meta": meta,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json_atomic(directory / REF_MANIFEST, manifest)
    return directory


@torch.no_grad()
def compute_reference_logps(model: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int,
                            batch_pairs: int = 16) -> np.ndarray:
    """(pairs, 2) summed completion log-probs, fp32, in eval mode. Pairs are batched in length order so
    padding stays small; the result is in the pairs' order."""
    from ..losses.preference import pair_logps

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(pairs), 2), dtype=np.float32)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].max_length)
    try:
        for s in range(0, len(order), batch_pairs):
            idx = order[s:s + batch_pairs]
            batch = collate_pairs([pairs[i] for i in idx], pad_id)
            logps, _ = pair_logps(model, {k: v.to(device) for k, v in batch.items()})
            out[idx] = logps.float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def load_reference_model(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """pi_ref in fp32 (an adapter directory is folded into its base). (A module-level function so tests can
    count constructions.)"""
    from ..model.peft_io import load_model

    return load_model(path, dtype=torch.float32, device=device)


def reference_logps(pairs: Sequence[EncodedPair], *, data_hash: str, tokenizer_fingerprint: str, reference: str | Path,
                    pad_id: int, directory: str | Path | None = None, overwrite: bool = False, batch_pairs: int = 16,
                    device: torch.device | str = "cpu", is_main: bool = True,
                    barrier: Callable[[], None] | None = None,
                    model: torch.nn.Module | None = None,
                    reference_variant: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The cached reference log-probs for `pairs`, computing (and storing) them only when needed.

    -> ((pairs, 2) float32, info {directory, status: hit | computed | recomputed, key}). Under data
    parallelism rank 0 computes while the others wait at `barrier`, then read the file. `model`, when given,
    computes in place of loading `reference` — it must compute the same function as `reference`'s weights
    (LoRA: the policy with its adapters disabled), since the cache stays keyed on those weights;
    `reference_variant` marks a model that computes them differently (QLoRA: `nf4` — a quantised base).
    """
    weights = reference_weights_sha256(reference)
    if reference_variant:
        weights = f"{weights}+{reference_variant}"
    key = cache_key(data_hash, tokenizer_fingerprint, weights)
    where = Path(directory) if directory else default_cache_dir(key)
    info: dict[str, Any] = {"directory": str(where), "key": key}
    status = "computed"
    try:
        values = read_cache(where, key, len(pairs))
    except StaleCacheError as err:
        if not overwrite or not directory:
            raise StaleCacheError(f"{err}; set stage.ref_cache_overwrite=true to recompute it, or point "
                                  "stage.ref_cache elsewhere") from None
        values, status = None, "recomputed"
    if values is not None:
        return values, {**info, "status": "hit"}
    if is_main:
        ref_model = model if model is not None else load_reference_model(reference, device)
        started = time.perf_counter()
        values = compute_reference_logps(ref_model, pairs, pad_id, batch_pairs)
        del ref_model
        seconds = round(time.perf_counter() - started, 3)
        write_cache(where, key, values, {"reference": str(reference), "seconds": seconds, "batch_pairs": batch_pairs})
    if barrier is not None:
        barrier()
    if not is_main:
        values = read_cache(where, key, len(pairs))
    return values, {**info, "status": status}
