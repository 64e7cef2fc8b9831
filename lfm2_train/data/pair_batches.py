"""Fixed lists of preference-pair batches (validation, and a probe of the training pairs)."""

from __future__ import annotations

import numpy as np
import torch

from .preference import PreferencePairs, collate_pairs


def pair_batches(pairs: PreferencePairs, index: np.ndarray, pad_id: int, ref: np.ndarray | None, size: int,
                 limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Collated batches of `size` pairs, in `index` order (at most `limit`): the validation batches and the
    training probe the end-of-run pair metrics are computed on."""
    out = []
    for s in range(0, len(index), size):
        idx = [int(i) for i in index[s:s + size]]
        out.append(collate_pairs([pairs.pairs[i] for i in idx], pad_id, ref, idx))
        if limit is not None and len(out) >= limit:
            break
    return out
