"""Chain files and the runner's skip / resume / invalidate rules, with fake stages (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lfm2_train.chain import ChainInterrupted, ChainRunner, ChainSpecError, load_chain
from lfm2_train.chain.runner import fingerprints

CHAIN = """
description: test chain
common: [trainer.log_every=1]
steps:
  - name: a
    stage: pretrain
    overrides: [trainer.max_steps=3]
    evaluate: true
  - name: b
    stage: sft
    overrides: ["model.init_from={a}/final", "x={out}"]
    evaluate: true
"""


def _write(tmp_path: Path, text: str = CHAIN, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class FakeStages:
    """Records each call; writes a `final/` model directory (config + weights) like a real stage; can stop one
    step once."""

    def __init__(self, interrupt: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.interrupt = interrupt

    def __call__(self, overrides: list[str]) -> dict:
        self.calls.append(overrides)
        out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
        stage = next(o.split("=", 1)[1] for o in overrides if o.startswith("stage="))
        if self.interrupt == stage:
            self.interrupt = None
            (out / "partial").write_text("checkpoint")
            return {"status": "interrupted", "steps": 1}
        (out / "final").mkdir(parents=True, exist_ok=True)
        (out / "final" / "config.json").write_text("{}")
        (out / "final" / "model.safetensors").write_bytes(b"weights")
        return {"status": "finished", "steps": 3, "loss": 1.5, "final": str(out / "final")}


def _runner(spec, workdir, stages, settings=("seed=0",)):
    return ChainRunner(spec=spec, workdir=workdir, run_stage=stages, settings=list(settings),
                       evaluate=lambda d: {"accuracy": 0.5, "n": 4, "model": str(d)}, log=lambda m: None)


def test_placeholders_become_step_directories_and_overrides_are_ordered(tmp_path):
    spec = load_chain(str(_write(tmp_path)))
    stages = FakeStages()
    records = _runner(spec, tmp_path / "w", stages).run()
    assert [r.status for r in records] == ["done", "done"]
    b = stages.calls[1]
    assert b[0] == "stage=sft" and "trainer.log_every=1" in b
    assert f"model.init_from={tmp_path / 'w' / '00-a'}/final" in b
    assert f"x={tmp_path / 'w' / '01-b'}" in b and b[-1] == f"output_dir={tmp_path / 'w' / '01-b'}"
    assert records[1].metrics["model"] == str(tmp_path / "w" / "01-b" / "final")
    marker = json.loads((tmp_path / "w" / "01-b" / "chain_step.json").read_text())
    assert marker["status"] == "done" and marker["metrics"]["accuracy"] == 0.5


def test_rerun_skips_finished_steps(tmp_path):
    spec = load_chain(str(_write(tmp_path)))
    _runner(spec, tmp_path / "w", FakeStages()).run()
    again = FakeStages()
    records = _runner(spec, tmp_path / "w", again).run()
    assert again.calls == [] and [r.status for r in records] == ["skipped", "skipped"]
    assert records[0].summary["loss"] == 1.5 and records[0].metrics["accuracy"] == 0.5


def test_interrupted_step_resumes_in_place_then_later_steps_run(tmp_path):
    spec = load_chain(str(_write(tmp_path)))
    stages = FakeStages(interrupt="sft")
    with pytest.raises(ChainInterrupted, match="'b'"):
        _runner(spec, tmp_path / "w", stages).run()
    assert (tmp_path / "w" / "01-b" / "partial").is_file()
    again = FakeStages()
    records = _runner(spec, tmp_path / "w", again).run()
    assert [r.status for r in records] == ["skipped", "done"] and len(again.calls) == 1
    assert (tmp_path / "w" / "01-b" / "partial").is_file()  # resumed in the same directory, nothing moved


def test_changed_step_reruns_it_and_everything_after_and_keeps_old_outputs(tmp_path):
    spec = load_chain(str(_write(tmp_path)))
    _runner(spec, tmp_path / "w", FakeStages()).run()
    changed = load_chain(str(_write(tmp_path, CHAIN.replace("max_steps=3", "max_steps=4"))))
    stages = FakeStages()
    records = _runner(changed, tmp_path / "w", stages).run()
    assert [r.status for r in records] == ["done", "done"] and len(stages.calls) == 2
    assert (tmp_path / "w" / "00-a.stale-1" / "chain_step.json").is_file()
    assert (tmp_path / "w" / "01-b.stale-1").is_dir()


def test_fingerprints_chain_and_ignore_cosmetic_settings(tmp_path):
    spec = load_chain(str(_write(tmp_path)))
    base = fingerprints(spec, ["seed=0"])
    assert fingerprints(spec, ["seed=0"]) == base
    other = fingerprints(spec, ["seed=1"])
    assert other["a"] != base["a"] and other["b"] != base["b"]
    edited = load_chain(str(_write(tmp_path, CHAIN.replace("max_steps=3", "max_steps=9"), "d.yaml")))
    assert fingerprints(edited, ["seed=0"])["b"] != base["b"]  # a later step inherits an earlier change
    # logger / progress-bar overrides are passed as `cosmetic` and never reach the fingerprint
    _runner(spec, tmp_path / "w", FakeStages()).run()
    quiet = ChainRunner(spec=spec, workdir=tmp_path / "w", run_stage=FakeStages(), settings=["seed=0"],
                        cosmetic=["logger.wandb=false"], evaluate=lambda d: {}, log=lambda m: None)
    assert [r.status for r in quiet.run()] == ["skipped", "skipped"]


@pytest.mark.parametrize("text, match", [
    ("steps: []", "non-empty `steps`"),
    ("steps:\n  - {name: a, stage: pretrain, job: tokenize}", "exactly one of"),
    ("steps:\n  - {name: a, job: nope}", "unknown job 'nope'"),
    ("steps:\n  - {name: a, stage: pretrain, overrides: ['x={b}']}", "`{b}` does not name an earlier step"),
    ("steps:\n  - {name: a, stage: pretrain}\n  - {name: a, stage: sft}", "used twice"),
    ("steps:\n  - {name: a, stage: pretrain, bogus: 1}", r"unknown key\(s\) \['bogus'\]"),
    ("stepz: []", "non-empty `steps`"),
    ("steps: [\n", "cannot read the chain file"),
    ("steps:\n  - {name: a, stage: pretrain, args: {x: 1}}", "take `overrides`"),
])
def test_bad_chain_files_are_refused_naming_the_file(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ChainSpecError, match=match) as err:
        load_chain(str(path))
    assert str(path) in str(err.value)


def test_unknown_chain_name():
    with pytest.raises(ChainSpecError, match="no such chain file"):
        load_chain("does_not_exist")


def test_packaged_tiny_chain_is_valid():
    spec = load_chain("tiny")
    assert spec.steps[0].job == "train_tokenizer" and spec.steps[-1].job == "export"


def test_changed_evaluation_settings_rescore_without_retraining(tmp_path):
    spec = load_chain(str(_write(tmp_path)))
    _runner(spec, tmp_path / "w", FakeStages()).run()
    scored = []
    runner = ChainRunner(spec=spec, workdir=tmp_path / "w", run_stage=FakeStages(), settings=["seed=0"],
                         evaluate=lambda d: scored.append(d) or {"accuracy": 0.75, "n": 8}, eval_key="other",
                         log=lambda m: None)
    records = runner.run()
    assert [r.status for r in records] == ["skipped", "skipped"] and len(scored) == 2
    assert records[1].metrics["accuracy"] == 0.75
    assert json.loads((tmp_path / "w" / "01-b" / "chain_step.json").read_text())["eval_key"] == "other"


def test_a_data_job_killed_midway_is_redone_on_the_next_run(tmp_path, monkeypatch):
    import data_pipelines.curriculum as job

    spec = load_chain(str(_write(tmp_path, "steps:\n  - {name: order, job: curriculum, args: {dataset: x}}\n")))
    calls = []

    def killed(cfg):
        calls.append(dict(cfg))
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        _runner(spec, tmp_path / "w", FakeStages()).run()
    assert json.loads((tmp_path / "w" / "00-order" / "chain_step.json").read_text())["status"] == "running"
    monkeypatch.setattr(job, "run", lambda cfg: calls.append(dict(cfg)) or {"status": "complete"})
    records = _runner(spec, tmp_path / "w", FakeStages()).run()
    assert [r.status for r in records] == ["done"] and len(calls) == 2
    assert calls[1]["overwrite"] is True  # whatever the killed run left is replaced, not trusted


def test_the_table_says_which_problems_and_documents_its_metrics_measure():
    from lfm2_train.chain.report import COLUMNS
    from lfm2_train.stages.chain import metric_legend

    assert COLUMNS[-2:] == ("task_acc", "lm_loss")
    legend = metric_legend(128, 12345, [0, 1], "01-shards")
    assert "128 problems (levels [0, 1], seed 12345)" in legend
    assert "held-out documents of 01-shards" in legend
    assert "lm_loss" not in metric_legend(8, 1, None, None)
