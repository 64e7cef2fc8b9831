"""Replaying pre-training rows inside another stream's batches: exact share, order, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm2_train.data.mixed_stream import MixedStream


class _Counter:
    """A stream whose rows say where they came from (`tag`) and in which order (`input_ids`)."""

    def __init__(self, tag: int) -> None:
        self.tag, self.state = tag, {"next": 0}

    def next_batch(self, n: int) -> dict[str, torch.Tensor]:
        start = self.state["next"]
        self.state = {"next": start + n}
        ids = torch.arange(start, start + n).unsqueeze(1).repeat(1, 4)  # (n, 4)
        return {"input_ids": ids, "labels": torch.full((n, 4), self.tag),
                "doc_ids": torch.zeros(n, 4, dtype=torch.long), "token_index": ids}

    def load_state(self, state) -> None:
        self.state = dict(state)


@pytest.mark.parametrize("fraction,batch", [(0.125, 16), (0.3, 8), (0.0, 4), (0.5, 3)])
def test_the_replayed_share_is_exact_over_the_run(fraction, batch):
    mix = MixedStream(_Counter(0), _Counter(1), fraction)
    tags = torch.cat([mix.next_batch(batch)["labels"][:, 0] for _ in range(40)])
    assert int(tags.sum()) == int(np.floor(40 * batch * fraction))
    per_batch = [mix.replay_rows(batch, i) for i in range(40)]
    assert max(per_batch) - min(per_batch) <= 1  # spread evenly, not bunched


def test_resume_gives_the_same_batches_and_drops_foreign_keys():
    full = MixedStream(_Counter(0), _Counter(1), 0.3)
    expected = [full.next_batch(8) for _ in range(6)]
    part = MixedStream(_Counter(0), _Counter(1), 0.3)
    for _ in range(3):
        part.next_batch(8)
    resumed = MixedStream(_Counter(0), _Counter(1), 0.3)
    resumed.load_state(part.state)
    for want in expected[3:]:
        got = resumed.next_batch(8)
        assert set(got) == {"input_ids", "labels", "doc_ids"}
        assert all(torch.equal(got[k], want[k]) for k in got)


def test_fraction_must_leave_room_for_the_task():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MixedStream(_Counter(0), _Counter(1), 1.0)
