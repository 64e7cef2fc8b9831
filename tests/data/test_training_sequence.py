"""The document order a run reads: a curriculum restricted to the training split and repeated, or seeded
shuffles, one fresh permutation per epoch."""

from __future__ import annotations

import numpy as np

from lfm2_train.data.pacing import PacingConfig
from lfm2_train.data.training_sequence import training_sequence


def test_a_curriculum_keeps_its_order_over_the_training_documents_and_repeats():
    train = np.array([0, 2, 3, 5])
    base = np.array([5, 4, 3, 2, 1, 0])  # held-out documents 1 and 4 are dropped
    seq = training_sequence(train, base, PacingConfig(), n_samples=10, seed=0)
    assert seq.tolist() == [5, 3, 2, 0, 5, 3, 2, 0, 5, 3]


def test_without_a_curriculum_each_epoch_is_a_fresh_seeded_permutation():
    train = np.arange(7)
    seq = training_sequence(train, None, PacingConfig(), n_samples=21, seed=3)
    epochs = seq.reshape(3, 7)
    assert all(sorted(e.tolist()) == list(range(7)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) > 1
    assert np.array_equal(seq, training_sequence(train, None, PacingConfig(), n_samples=21, seed=3))
    assert len(training_sequence(train, None, PacingConfig(), n_samples=3, seed=3)) == 7  # at least one pass
