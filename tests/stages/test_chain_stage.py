"""The whole chain on a micro version of the tiny recipe: every stage runs, outputs feed the next stage
through directories, a killed run resumes to the same numbers and the same weights, and a rerun skips."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lfm2_train.config import register_configs
from lfm2_train.stages import run_stage
from lfm2_train.stages.chain import compose_stage

MICRO = """
description: micro chain for tests
eval_levels: [0, 1]
common: [trainer.checkpoint_every=2, trainer.eval_batches=2, trainer.log_every=1, data.verify_hashes=false]
steps:
  - {name: tokenizer, job: train_tokenizer, args: {vocab_size: 512, max_documents: 1500}}
  - {name: shards, job: tokenize, args: {tokenizer: "{tokenizer}", shard_tokens: 16384, total_tokens: 40000}}
  - {name: difficulty, job: scoring, args: {dataset: "{shards}", scorer: compression}}
  - {name: curriculum, job: curriculum, args: {dataset: "{shards}", scores: compression, name: easy_to_hard}}
  - name: teacher
    stage: pretrain
    overrides: ["data.path={shards}", data.order=easy_to_hard, trainer.max_steps=6, trainer.micro_batch_size=4,
                data.seq_len=64]
    evaluate: true
  - name: teacher_cache
    stage: cache_teacher
    overrides: ["data.path={shards}", "stage.teacher={teacher}/final", stage.k=8, stage.progress_bar=false,
                "stage.output={out}/cache"]
  - name: student
    stage: distill
    overrides: ["data.path={shards}", "stage.teacher_cache={teacher_cache}/cache", stage.k=8, trainer.max_steps=4,
                trainer.micro_batch_size=4, data.seq_len=64]
  - name: sft
    stage: sft
    overrides: ["model.init_from={student}/final", stage.bundled_rows=120, "stage.bundled_levels=[0,1]",
                stage.epochs=null, trainer.max_steps=6, data.seq_len=64, trainer.micro_batch_size=8]
    evaluate: true
  - name: pairs
    job: preference_pairs
    args: {model: "{sft}/final", bundled_rows: 12, bundled_levels: [0, 1], n: 3, max_new_tokens: 12, batch_size: 12}
  - name: pref_a
    stage: preference
    overrides: ["model.init_from={sft}/final", "stage.dataset={pairs}/pairs.jsonl", "stage.ref_cache={out}/ref",
                stage.epochs=null, trainer.max_steps=2, trainer.micro_batch_size=4, optim.lr=1e-4]
  - name: pref_b
    stage: preference
    overrides: ["model.init_from={sft}/final", "stage.dataset={pairs}/pairs.jsonl", "stage.ref_cache={out}/ref",
                stage.epochs=null, trainer.max_steps=2, trainer.micro_batch_size=4, optim.lr=1e-4, seed=1]
  - name: merge
    stage: merge
    overrides:
      - stage.merge_method=linear
      - "stage.models=[{model: '{pref_a}/final', parameters: {weight: 0.5}},
                       {model: '{pref_b}/final', parameters: {weight: 0.5}}]"
      - "stage.candidates=[{name: soup}, {name: ta, merge_method: task_arithmetic, base_model: '{sft}/final'}]"
      - stage.evaluation=arithmetic
      - stage.eval_problems=8
    evaluate: true
  - name: eval
    stage: eval
    overrides: ["model.init_from={merge}/final", "data.path={shards}", "stage.tasks=[{kind: perplexity}]"]
  - {name: export, job: export, args: {model: "{merge}/final"}}
"""


def _chain(chain: Path, workdir: Path, *extra: str) -> dict:
    register_configs()
    cfg = compose_stage(["stage=chain", f"stage.chain={chain}", f"stage.workdir={workdir}", "logger=disabled",
                         "trainer.progress_bar=false", "stage.eval_problems=8", f"output_dir={workdir}/hydra", *extra])
    return run_stage(cfg)


def _numbers(workdir: Path) -> list[tuple]:
    summary = json.loads((workdir / "chain_summary.json").read_text())
    return [(s["step"], s["steps"], s["loss"], s["val_loss"], s["task_acc"]) for s in summary["steps"]]


def _weights_hash(workdir: Path) -> str:
    return hashlib.sha256((workdir / "13-export" / "model" / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.slow
def test_micro_chain_runs_every_stage_resumes_exactly_and_skips_when_done(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM2_TRAIN_CACHE", str(tmp_path / "cache"))
    chain = tmp_path / "micro.yaml"
    chain.write_text(MICRO)

    full = _chain(chain, tmp_path / "a")
    assert full["status"] == "finished"
    rows = {r["step"]: r for r in full["steps"]}
    assert all(r["status"] == "done" for r in rows.values())
    assert rows["teacher"]["steps"] == 6 and rows["sft"]["task_acc"] is not None
    report = (tmp_path / "a" / "report.md").read_text()
    assert "| merge |" in report and "Task metric along the chain" in report
    assert (tmp_path / "a" / "11-merge" / "selection.md").is_file()
    assert (tmp_path / "a" / "12-eval" / "eval_results.json").is_file()
    assert Path(full["final"]) == tmp_path / "a" / "13-export" / "model"

    # killed inside the teacher's training (the trainer's SIGTERM path), then the same command again
    stopped = _chain(chain, tmp_path / "b", "trainer.stop_after_steps=3")
    assert stopped["status"] == "interrupted"
    marker = json.loads((tmp_path / "b" / "04-teacher" / "chain_step.json").read_text())
    assert marker["status"] == "running"
    resumed = _chain(chain, tmp_path / "b")
    assert [r["status"] for r in resumed["steps"]][:4] == ["skipped"] * 4
    assert _numbers(tmp_path / "b") == _numbers(tmp_path / "a")  # same losses and task metrics everywhere
    assert _weights_hash(tmp_path / "b") == _weights_hash(tmp_path / "a")  # and the same exported bytes

    again = _chain(chain, tmp_path / "a")
    assert all(r["status"] == "skipped" for r in again["steps"])
    assert _numbers(tmp_path / "a") == _numbers(tmp_path / "b")


def test_until_must_name_a_step(tmp_path):
    chain = tmp_path / "micro.yaml"
    chain.write_text(MICRO)
    with pytest.raises(ValueError, match="stage.until='nope' is not a step"):
        _chain(chain, tmp_path / "w", "stage.until=nope")
