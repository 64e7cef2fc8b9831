"""Selection: candidate expansion, ranking, tables, and the best merge published as final/."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from lfm2_train.merge.config import MergeConfigError
from lfm2_train.merge.selection import Row, expand_candidates, rank, select_merge


def test_grid_and_variants_expand_to_named_candidates():
    base = {"merge_method": "slerp", "base_model": "a", "models": ["a", "b"], "parameters": {"t": 0.5}}
    cands = expand_candidates(base, grid={"t": [0.25, 0.5, 0.75]})
    assert [c.name for c in cands] == ["t=0.25", "t=0.5", "t=0.75"]
    assert [c.config["parameters"]["t"] for c in cands] == [0.25, 0.5, 0.75]
    assert base["parameters"]["t"] == 0.5  # the base configuration is not mutated
    lin = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                {"model": "b", "parameters": {"weight": 1}}]}
    cands = expand_candidates(lin, variants=[{"name": "plain"}, {"parameters": {"normalize": False}}],
                              grid={"models.1.parameters.weight": [0.5, 2.0]})
    assert [c.name for c in cands] == ["plain,models.1.parameters.weight=0.5", "plain,models.1.parameters.weight=2.0",
                                       "v1,models.1.parameters.weight=0.5", "v1,models.1.parameters.weight=2.0"]
    assert cands[3].config["models"][1]["parameters"]["weight"] == 2.0 and cands[3].config["parameters"]
    with pytest.raises(MergeConfigError, match="not an index"):
        expand_candidates(lin, grid={"models.5.parameters.weight": [1]})
    with pytest.raises(MergeConfigError, match="non-empty list"):
        expand_candidates(lin, grid={"t": []})


def test_rank_direction_and_missing_values_last():
    rows = [Row("a", "merge", "", {"m": 2.0}), Row("b", "merge", "", {"m": math.nan}),
            Row("c", "input", "", {"m": 1.0})]
    assert [r.name for r in rank(rows, "m", higher_is_better=True)] == ["a", "c", "b"]
    assert [r.name for r in rank(rows, "m", higher_is_better=False)] == ["c", "a", "b"]


def test_select_merge_publishes_the_best_and_ranks_inputs(tmp_path, make_checkpoint):
    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b", seed=1)
    base = {"merge_method": "slerp", "base_model": str(a), "models": [str(a), str(b)], "parameters": {"t": 0.5}}
    cands = expand_candidates(base, grid={"t": [0.2, 0.6, 0.9]})

    def evaluate(path: Path) -> dict[str, float]:  # best at t = 0.6; inputs score t = 0 and t = 1
        manifest = path / "lfm2_train_manifest.json"
        t = json.loads(manifest.read_text())["merge_config"]["parameters"]["t"] if manifest.is_file() else \
            (0.0 if path.name == "a" else 1.0)
        return {"score": -abs(t - 0.6), "t": t}

    summary = select_merge(cands, evaluate, "score", True, tmp_path / "run", hash_inputs=False)
    assert summary["chosen"] == "t=0.6" and summary["best_input_beats_merge"] is False
    final = tmp_path / "run" / "final"
    manifest = json.loads((final / "lfm2_train_manifest.json").read_text())
    assert manifest["selection"]["chosen"] == "t=0.6" and manifest["merge_config"]["parameters"]["t"] == 0.6
    rows = list(csv.DictReader(open(tmp_path / "run" / "selection.csv")))
    assert [r["name"] for r in rows] == ["t=0.6", "t=0.9", "t=0.2", "b", "a"]
    assert [r["kind"] for r in rows] == ["merge"] * 3 + ["input"] * 2
    md = (tmp_path / "run" / "selection.md").read_text()
    assert "Chosen: **t=0.6**" in md and "beats the best input" in md
    with pytest.raises(KeyError, match="not the selection metric 'loss'"):
        select_merge(cands[:1], evaluate, "loss", False, tmp_path / "run2", hash_inputs=False)


def test_select_inputs_keeps_an_unmerged_input_when_it_outranks_every_merge(tmp_path, monkeypatch):
    from lfm2_train.merge import selection

    a, b = tmp_path / "run_a" / "final", tmp_path / "run_b" / "final"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "weights.txt").write_text(d.parent.name)

    def fake_merge(spec, path, **kw):
        Path(path).mkdir(parents=True)
        (Path(path) / "lfm2_train_manifest.json").write_text("{}")

    monkeypatch.setattr(selection, "merge_checkpoints", fake_merge)
    monkeypatch.setattr(selection, "parse_merge_config", lambda c, **kw: SimpleNamespace(models=[str(a), str(b)],
                                                                                         raw=c))
    scores = {str(a): 0.9, str(b): 0.5}
    evaluate = lambda p: {"acc": scores.get(str(p), 0.7)}  # noqa: E731 - merges score 0.7
    cands = [selection.Candidate("soup", {"merge_method": "linear"})]
    merged = selection.select_merge(cands, evaluate, "acc", True, tmp_path / "m1")
    assert merged["chosen"] == "soup" and merged["best_input_beats_merge"] and merged["best_input"] == "run_a/final"
    kept = selection.select_merge(cands, evaluate, "acc", True, tmp_path / "m2", select_inputs=True)
    assert kept["chosen"] == "run_a/final" and kept["chosen_kind"] == "input" and kept["best_input_beats_merge"]
    assert (tmp_path / "m2" / "final" / "weights.txt").read_text() == "run_a"
    assert "Chosen: **run_a/final** (input" in (tmp_path / "m2" / "selection.md").read_text()
