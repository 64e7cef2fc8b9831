"""Faults that must never lose work or run code: pruning after corrupt or foreign checkpoints, planted
pickles, torn and duplicated metric rows, re-runs of finished stages, partial exports, exit codes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from omegaconf import OmegaConf

from lfm2_train.artifacts import model_dir_problem
from lfm2_train.config import register_configs
from lfm2_train.engine import trainer as trainer_module
from lfm2_train.engine.checkpoint import CHECKSUMS, CheckpointError, _hash_tree
from lfm2_train.engine.observe import MetricsLogger, read_metrics
from lfm2_train.exit_codes import EXIT_INTERRUPTED
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.stages import run_stage

REPO = Path(__file__).resolve().parents[2]
BASE = ["stage=pretrain", "logger=disabled", "trainer.progress_bar=false", "trainer.max_steps=6",
        "trainer.micro_batch_size=4", "data.seq_len=32", "trainer.eval_every=3", "trainer.checkpoint_every=2",
        "optim.warmup_steps=2", "trainer.log_every=1"]


def _cfg(out: Path, data: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*BASE, f"output_dir={out}", f"data.path={data}",
                                                            *overrides])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


def _steps(out: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in sorted((out / "checkpoints").glob("step-*"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset) -> Path:
    """One uninterrupted run that the faulty ones are compared with."""
    out = tmp_path_factory.mktemp("reference")
    run_stage(_cfg(out, tiny_dataset))
    return out


def _reseal(checkpoint: Path) -> None:
    """Recompute checksums.json, as an attacker who plants a file would."""
    (checkpoint / CHECKSUMS).write_text(json.dumps(_hash_tree(checkpoint)))


# ---------------------------------------------------------------------------------------------- pruning
def test_resume_never_sets_old_checkpoints_aside_and_keeps_the_new_ones(tmp_path, tiny_dataset, reference, capsys):
    run_stage(_cfg(tmp_path, tiny_dataset))  # a finished run: checkpoints 4 and 6
    run_stage(_cfg(tmp_path, tiny_dataset, "trainer.resume=never", "trainer.stop_after_steps=3"))
    out = capsys.readouterr().out
    assert "trainer.resume=never: 2 checkpoint(s) of an earlier run" in out
    assert _steps(tmp_path) == [2, 3]  # the new run's checkpoints survive its own pruning
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "set-aside").iterdir()) == ["step-00000004",
                                                                                          "step-00000006"]
    resumed = run_stage(_cfg(tmp_path, tiny_dataset))
    assert resumed["start_step"] == 3 and resumed["status"] == "finished"
    assert _losses(tmp_path) == _losses(reference)


def test_all_checkpoints_corrupt_is_announced_and_new_ones_survive(tmp_path, tiny_dataset, reference, capsys):
    run_stage(_cfg(tmp_path, tiny_dataset, "trainer.stop_after_steps=5"))  # checkpoints 4 and 5
    for step in _steps(tmp_path):
        (tmp_path / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").write_text("{}")
    run_stage(_cfg(tmp_path, tiny_dataset, "trainer.stop_after_steps=3"))
    out = capsys.readouterr().out
    assert "no valid checkpoint among the 2" in out and "starting from step 0" in out
    assert _steps(tmp_path) == [2, 3]
    resumed = run_stage(_cfg(tmp_path, tiny_dataset))
    assert resumed["start_step"] == 3
    assert _losses(tmp_path) == _losses(reference)


# ---------------------------------------------------------------------------------------------- no unpickling
class _Planted:
    """Unpickling this object would create a marker file: what a crafted checkpoint file could do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("victim", ["rng.pt", "dcp/.metadata"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_before_it_runs(tmp_path, tiny_dataset, victim):
    """rng.pt is read with weights_only=True; DCP's .metadata (which DCP itself would `pickle.load`) through
    an unpickler that builds DCP's metadata classes only."""
    run_stage(_cfg(tmp_path, tiny_dataset, "trainer.stop_after_steps=2"))
    ckpt = tmp_path / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    if victim.endswith(".metadata"):
        (ckpt / victim).write_bytes(pickle.dumps({"state": _Planted(str(marker))}))
    else:
        torch.save({"state": _Planted(str(marker))}, ckpt / victim)
    _reseal(ckpt)  # the checksums cannot tell a crafted file from a good one
    with pytest.raises(CheckpointError, match=f"{victim} holds something other than"):
        run_stage(_cfg(tmp_path, tiny_dataset))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- metrics
def test_torn_metrics_line_neither_bricks_nor_duplicates(tmp_path, tiny_dataset, reference):
    run_stage(_cfg(tmp_path, tiny_dataset, "trainer.stop_after_steps=3", "logger.plot=true"))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2')  # the disk filled mid-line
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 1 malformed line\(s\) \(line 5\)"):
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 3]
    summary = run_stage(_cfg(tmp_path, tiny_dataset, "logger.plot=true"))
    assert summary["status"] == "finished" and Path(summary["loss_curve"]).is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
    assert _losses(tmp_path) == _losses(reference)
    assert [r["step"] for r in _rows(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_rows_logged_after_the_last_checkpoint_appear_once_after_a_kill(tmp_path, tiny_dataset, reference):
    run_stage(_cfg(tmp_path, tiny_dataset, "trainer.stop_after_steps=3"))
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000003")  # as if killed after logging step 3
    run_stage(_cfg(tmp_path, tiny_dataset))
    steps = [r["step"] for r in _rows(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert _losses(tmp_path) == _losses(reference)
    superseded = [json.loads(x) for x in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert {r["step"] for r in superseded} == {3}  # kept for the record, out of the curve


def test_a_broken_plot_never_fails_a_finished_stage(tmp_path, tiny_dataset, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("matplotlib exploded")

    monkeypatch.setattr(trainer_module, "plot_losses", broken)
    with pytest.warns(UserWarning, match="loss curve not drawn"):
        summary = run_stage(_cfg(tmp_path, tiny_dataset, "logger.plot=true", "trainer.max_steps=2"))
    assert summary["status"] == "finished" and summary["loss_curve"] is None


@pytest.mark.parametrize("env_mode", ["disabled", "offline", None])
def test_wandb_mode_environment_variable_wins(tmp_path, monkeypatch, env_mode):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None),
                                 Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    if env_mode is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env_mode)
    cfg = OmegaConf.create({"logger": {"wandb": True, "wandb_mode": "online", "project": "p", "run_name": None},
                            "trainer": {"progress_bar": False}, "stage": {"name": "pretrain"}})
    MetricsLogger(tmp_path, cfg, total_steps=1, start_step=0, enabled=True).close()
    if env_mode == "disabled":
        assert calls == []
    else:
        assert [c["mode"] for c in calls] == [env_mode or "online"]
        assert calls[0]["settings"] == {"silent": True, "console": "off"}  # one summary line, not wandb's ~150


# ---------------------------------------------------------------------------------------------- re-runs
def test_rerun_of_a_finished_stage_keeps_its_summary(tmp_path, tiny_dataset, reference):
    first = json.loads((reference / "summary.json").read_text())
    shutil.copytree(reference, tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # killed after training, before anything else was written
    shutil.rmtree(tmp_path / "run" / "final")
    again = run_stage(_cfg(tmp_path / "run", tiny_dataset))
    assert again["start_step"] == 6 and again["steps"] == 6
    for key in ("status", "loss", "val_loss", "val_ppl", "tokens"):
        assert again[key] == first[key], key
    assert model_dir_problem(Path(again["final"])) is None


def test_a_kill_during_export_never_leaves_a_partial_final(tmp_path, tiny_dataset, reference, monkeypatch):
    shutil.copytree(reference, tmp_path / "run")
    final = tmp_path / "run" / "final"
    before = LFM2ForCausalLM.from_pretrained(final).state_dict()

    def dies_midway(state, config, path, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # stands for the SIGKILL

    monkeypatch.setattr(trainer_module, "write_checkpoint", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run_stage(_cfg(tmp_path / "run", tiny_dataset))
    assert model_dir_problem(final) is None  # the previous complete export is still there
    after = LFM2ForCausalLM.from_pretrained(final).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    partial = next((tmp_path / "run").glob(".final.tmp-*"))
    assert "no model.safetensors" in model_dir_problem(partial)  # what a consumer would refuse


def test_an_interrupted_stage_exits_with_the_documented_code(tmp_path, tiny_dataset):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lfm2_train", *BASE, f"output_dir={tmp_path}", f"data.path={tiny_dataset}"]
    stopped = subprocess.run([*cmd, "trainer.stop_after_steps=1"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert stopped.returncode == EXIT_INTERRUPTED == 75, stopped.stderr[-2000:]
    finished = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
