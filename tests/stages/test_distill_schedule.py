from __future__ import annotations

import pytest

from lfm2_train.stages.distill import anneal


def test_anneal_shapes():
    assert anneal(2.0, None, 0.7, "linear") == 2.0
    assert anneal(2.0, 1.0, 0.0, "linear") == 2.0 and anneal(2.0, 1.0, 1.0, "linear") == 1.0
    assert anneal(2.0, 1.0, 0.5, "linear") == pytest.approx(1.5)
    assert anneal(0.0, 1.0, 0.25, "cosine") == pytest.approx(0.5 * (1 - 0.7071067811865476))
    assert anneal(0.0, 1.0, 2.0, "linear") == 1.0
    with pytest.raises(ValueError, match="stage.kd.schedule"):
        anneal(0.0, 1.0, 0.5, "exp")
