"""The latency / memory probe: in-process on a tiny model, and its failure path in a subprocess."""

from __future__ import annotations

import pytest

from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.search.measure import MeasureError, _percentile, measure, measure_in_subprocess


def test_measure_reports_every_metric_per_context():
    out = measure({"config": get_preset("tiny").to_dict(), "contexts": [8, 16], "decode_tokens": 3, "repeats": 1,
                   "threads": 1})
    assert set(out["contexts"]) == {"8", "16"}
    for m in out["contexts"].values():
        assert m["ttft_ms"] > 0 and m["decode_p95_ms"] >= m["decode_p50_ms"] > 0
    assert out["contexts"]["16"]["prefill_tok_s"] == pytest.approx(16_000 / out["contexts"]["16"]["ttft_ms"])
    n_params = LFM2ForCausalLM(get_preset("tiny")).num_parameters()
    assert out["peak_rss_mb"] > 0 and out["weights_mb"] == pytest.approx(n_params * 4 / 2**20)


def test_percentile_interpolates():
    assert _percentile([4, 1, 3, 2], 50) == 2.5 and _percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)


@pytest.mark.slow  # a fresh interpreter importing torch: ~3 s alone, ~10 s on a loaded 2-core machine
def test_a_failing_candidate_is_reported_not_raised_blindly():
    bad = {**get_preset("tiny").to_dict(), "hidden_size": -1}
    with pytest.raises(MeasureError, match="hidden_size"):
        measure_in_subprocess({"config": bad, "contexts": [8], "decode_tokens": 2}, timeout_s=120)
