"""The data jobs' shared entry point: `python -m data_pipelines.<job> key=value` and
`python -m data_pipelines <job> key=value` run the job, print its summary, and report a person's mistake
as `error: ...` with exit code 2 (as `python -m lfm2_train` does)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data_pipelines
from data_pipelines.__main__ import jobs
from data_pipelines._job import DataJob, without
from lfm2_train.data.format import Manifest, load_scores, write_shard
from lfm2_train.exit_codes import EXIT_USAGE

REPO = Path(__file__).resolve().parents[2]
JOBS = ("curriculum", "preference_pairs", "scoring", "sft_difficulty", "tokenize", "train_tokenizer")


def _python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    docs = [[5, 6, 7, 2], [8, 2], [9, 10, 11, 12, 13, 2]]
    flat = np.array([t for d in docs for t in d], dtype=np.uint16)
    shard = write_shard(data, "shard-00000", flat, np.cumsum([0] + [len(d) for d in docs]))
    Manifest("fp", 64, "uint16", 2, [shard]).save(data)
    return data


def test_every_job_declares_itself():
    assert set(JOBS) <= set(jobs())
    for info in pkgutil.iter_modules(data_pipelines.__path__):
        module = importlib.import_module(f"data_pipelines.{info.name}")
        if hasattr(module, "main") and not info.name.startswith("_"):  # a job: its entry point is shared
            assert isinstance(module.JOB, DataJob) and module.JOB.name == info.name
            assert module.main == module.JOB.main
    assert without("sources")({"a": 1, "sources": [1]}) == {"a": 1}


@pytest.mark.parametrize("entry", [("-m", "data_pipelines.scoring"), ("-m", "data_pipelines", "scoring")])
def test_runs_a_job_and_prints_its_summary(tmp_path, dataset, entry):
    out = _python(*entry, f"dataset={dataset}", "scorer=length", "progress=false",
                  f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout[out.stdout.index("{"):])["num_documents"] == 3
    assert load_scores(dataset, "length")[0].tolist() == [3.0, 1.0, 5.0]
    assert (tmp_path / "hydra" / "scoring.log").is_file()  # Hydra names the run after the job


def test_a_users_mistake_is_one_line_and_exit_2(tmp_path, dataset):
    out = _python("-m", "data_pipelines.scoring", f"dataset={dataset}", "scorer=nope",
                  f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert out.returncode == EXIT_USAGE
    assert out.stderr.startswith("error: unknown scorer 'nope'") and "Traceback" not in out.stderr
    verbose = _python("-m", "data_pipelines.scoring", f"dataset={dataset}", "scorer=nope", "--verbose",
                      f"hydra.run.dir={tmp_path / 'hydra'}", cwd=tmp_path)
    assert verbose.returncode not in (0, EXIT_USAGE) and "ValueError: unknown scorer 'nope'" in verbose.stderr


def test_the_package_lists_its_jobs(tmp_path):
    listing = _python("-m", "data_pipelines", cwd=tmp_path)
    assert listing.returncode == EXIT_USAGE and "usage: python -m data_pipelines <job>" in listing.stdout
    assert all(f"  {name} " in listing.stdout for name in JOBS)
    unknown = _python("-m", "data_pipelines", "_job", cwd=tmp_path)
    assert unknown.returncode == EXIT_USAGE and unknown.stderr.startswith("error: '_job' is not a data job")
