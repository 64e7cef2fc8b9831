"""`stage=search` end to end on a tiny space: outputs written, budgets enforced, ranks consistent."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.stages import run_stage

TINY = ["stage=search", "logger=disabled", "stage.space.hidden_sizes=[32,64]", "stage.space.num_layers=[2]",
        "stage.space.attention_counts=[1]", "stage.space.conv_L_cache=[3,5]", "stage.param_budget=60000",
        "stage.contexts=[16]", "stage.decode_tokens=4", "stage.repeats=1", "stage.train_steps=3",
        "stage.train_seq_len=32", "stage.train_batch_size=4", "stage.val_documents=8"]


def _cfg(out: Path, data: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*TINY, f"output_dir={out}", f"data.path={data}",
                                                            *overrides])


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "search_results.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


@pytest.mark.slow
def test_search_stage_measures_trains_ranks_and_writes_outputs(tmp_path, tiny_dataset):
    out = tmp_path / "run"
    summary = run_stage(_cfg(out, tiny_dataset))
    rows = _rows(out)
    # d32 layouts fit 60k parameters (~40k); the d64 ones (~136k) are recorded as over the budget.
    ranked = {n: r for n, r in rows.items() if r["status"] == "ranked"}
    assert set(ranked) == {"d32-L2-a[1]-k3-ff3", "d32-L2-a[1]-k5-ff3"}
    assert {r["status"] for n, r in rows.items() if n.startswith("d64")} == {"over_param_budget"}
    assert sorted(int(r["rank"]) for r in ranked.values()) == [1, 2]
    for r in ranked.values():
        assert float(r["ttft_ms@16"]) > 0 and float(r["decode_p95_ms@16"]) >= float(r["decode_p50_ms@16"]) > 0
        assert float(r["prefill_tok_s@16"]) > 0 and float(r["peak_rss_mb"]) > 0 and float(r["val_loss"]) > 0
        assert float(r["latency"]) == float(r["decode_p50_ms@16"]) and float(r["memory"]) == float(r["peak_rss_mb"])
        assert (Path(r["checkpoint"]) / "config.json").is_file()
        assert not (Path(r["checkpoint"]).parent / "checkpoints").exists()  # no optimizer state kept
    md = (out / "search_results.md").read_text()
    assert "| 1 | " in md and "over_param_budget" in md and "Reference point" in md
    assert (out / "search_front.png").stat().st_size > 1000
    doc = json.loads((out / "search_results.json").read_text())
    assert doc["meta"]["hypervolume"] > 0 and len(doc["candidates"]) == 4
    assert summary["best"] == next(n for n, r in ranked.items() if r["rank"] == "1")


def test_search_stage_drops_candidates_over_the_latency_budget(tmp_path, tiny_dataset, monkeypatch):
    # Synthetic measurements (no timing noise): the k5 layout decodes at 9 ms p95, over an 8 ms budget.
    import lfm2_train.stages.search as search_stage

    def fake_measure(spec, timeout_s):
        slow = spec["config"]["conv_L_cache"] == 5
        ctx = {"16": {"ttft_ms": 5.0, "prefill_tok_s": 3200.0, "decode_p50_ms": 8.5 if slow else 2.0,
                      "decode_p95_ms": 9.0 if slow else 2.5}}
        return {"contexts": ctx, "peak_rss_mb": 300.0, "rss_delta_mb": 10.0, "weights_mb": 0.2, "threads": 1}

    monkeypatch.setattr(search_stage, "measure_in_subprocess", fake_measure)
    out = tmp_path / "run"
    summary = run_stage(_cfg(out, tiny_dataset, "stage.max_decode_ms=8"))
    rows = _rows(out)
    dropped = rows["d32-L2-a[1]-k5-ff3"]
    assert dropped["status"] == "over_latency_budget" and dropped["rank"] == "" and dropped["val_loss"] == ""
    assert dropped["reason"] == "decode p95 9.00 ms > budget 8 ms at context 16"
    assert not (out / "candidates" / "d32-L2-a[1]-k5-ff3").exists()  # never trained
    kept = rows["d32-L2-a[1]-k3-ff3"]
    assert kept["status"] == "ranked" and kept["rank"] == "1" and float(kept["hv_share"]) == pytest.approx(1.0)
    assert summary["front"] == ["d32-L2-a[1]-k3-ff3"] and summary["ranked"] == 1
    assert "decode p95 9.00 ms > budget 8 ms" in (out / "search_results.md").read_text()


def test_search_stage_refuses_bad_settings(tmp_path, tiny_dataset):
    with pytest.raises(ValueError, match="unset model.init_from"):
        run_stage(_cfg(tmp_path, tiny_dataset, f"model.init_from={tmp_path}"))
    with pytest.raises(ValueError, match="stage.latency_metric='tpot'"):
        run_stage(_cfg(tmp_path, tiny_dataset, "stage.latency_metric=tpot"))
    with pytest.raises(ValueError, match=r"stage.contexts=\[\]"):
        run_stage(_cfg(tmp_path, tiny_dataset, "stage.contexts=[]"))
