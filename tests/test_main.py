"""`python -m lfm2_train` as a person meets it: a mistake costs one or two lines that name it and exit 2;
the traceback is one flag away."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _main(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "lfm2_train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,first_line", [
    (["stage=pretrain", "optim.lr=-1e-3"], "error: optim.lr=-0.001 is not valid: expected a learning rate > 0"),
    (["stage=pretrain", "+optim.lrr=1"], "error: unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
    (["recipe=lfm2-350m/pretrian"], "error: unknown recipe='lfm2-350m/pretrian'; did you mean 'lfm2-350m/pretrain'?"),
    (["stage=pretrain", "model.init_from=/does/not/exist", "trainer.max_steps=1"], "error: "),
    (["stage=distill"], "error: stage=distill needs stage.teacher_cache="),
    (["stage=chain", "stage.chain=BAD"], "error: "),  # BAD is replaced by a malformed chain file below
])
def test_user_errors_are_two_lines_and_exit_2(tmp_path, args, first_line):
    bad_chain = tmp_path / "chain.yaml"
    bad_chain.write_text("steps:\n  - {name: a, stage: pretrain, job: tokenize}\n")
    args = [a.replace("BAD", str(bad_chain)) for a in args]
    proc = _main(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert lines[-2].startswith(first_line) and "--verbose" in lines[-1], proc.stderr[-1000:]


def test_verbose_shows_the_traceback(tmp_path):
    proc = _main("stage=pretrain", "optim.lr=-1e-3", "--verbose", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
