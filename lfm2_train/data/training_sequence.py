"""The order a training run reads its documents (or conversations) in: a curriculum, optionally paced, or
seeded shuffles, repeated until the run has enough."""

from __future__ import annotations

import numpy as np

from .pacing import PacingConfig, paced_indices


def training_sequence(train_docs: np.ndarray, base_order: np.ndarray | None, pacing: PacingConfig,
                      n_samples: int, seed: int) -> np.ndarray:
    """The documents the run reads, in order: a curriculum (optionally paced) or seeded shuffles.

    `base_order` (global indices, easy -> hard) is restricted to the training documents. Without
    pacing, the order repeats as many times as needed (a fresh seeded shuffle per epoch when there is
    no curriculum order).
    """
    rng = np.random.default_rng(seed)
    if base_order is not None:
        order = base_order[np.isin(base_order, train_docs)]
    else:
        order = rng.permutation(train_docs)
    if pacing.kind != "none":
        return paced_indices(order, n_samples, pacing, seed)
    epochs, total = [order], len(order)
    while total < n_samples:
        nxt = order if base_order is not None else rng.permutation(train_docs)
        epochs.append(nxt)
        total += len(nxt)
    return np.concatenate(epochs)[:max(n_samples, len(order))]
