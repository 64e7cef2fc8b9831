"""LD-DPO's reference log-probs: pi_ref's log-prob of each response split into the part both responses of a
pair share in length and the tail past it (`stage.ld_alpha`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from .preference import EncodedPair, pairs_hash
from .ref_logps import reference_logps


def ld_reference_logps(pairs: list[EncodedPair], totals: np.ndarray, stage: DictConfig, reference: str,
                       tokenizer: Any, runtime: Any, model: torch.nn.Module | None = None,
                       reference_variant: str | None = None) -> np.ndarray:
    """LD-DPO's reference tails: (pairs, 2) totals -> (pairs, 2, 2) [total, tail past the shared length].

    pi_ref is causal, so its log-probs of a response's first k tokens are those of the response cut to k
    tokens: the shared part is one more cached pass over the pairs cut to the shorter response (its own
    content-addressed cache, or `<stage.ref_cache>/ld_shared`), and the tail is total - shared.
    """
    cut = [replace(p, chosen=p.chosen[:k], rejected=p.rejected[:k])
           for p in pairs for k in [min(len(p.chosen), len(p.rejected))]]
    shared, info = reference_logps(
        cut, data_hash=pairs_hash(cut), tokenizer_fingerprint=tokenizer.fingerprint(), reference=reference,
        pad_id=tokenizer.pad_token_id, directory=f"{stage.ref_cache}/ld_shared" if stage.ref_cache else None,
        overwrite=stage.ref_cache_overwrite, batch_pairs=stage.ref_batch_pairs, device=runtime.device,
        is_main=runtime.is_main, barrier=runtime.barrier, model=model, reference_variant=reference_variant)
    if runtime.is_main:
        print(f"preference: reference log-probs of the shared parts (ld_alpha) {info['status']} ({info['directory']})")
    return np.stack([totals, totals - shared], axis=-1)
