"""The data-job registry: every job module is declared as an entry point, and lookups fail with the names.

The registry reads installed metadata; the unit tests replace `importlib.metadata.entry_points` with a fixed
list so they do not depend on how (or whether) the project is installed.
"""

from __future__ import annotations

import ast
import importlib.metadata
import pkgutil
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

import data_pipelines
from lfm2_train import jobs

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def declared_jobs() -> dict[str, str]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["entry-points"][jobs.GROUP]


def fake_registry(monkeypatch: pytest.MonkeyPatch, entries: dict[str, str]) -> None:
    points = [importlib.metadata.EntryPoint(name, value, jobs.GROUP) for name, value in entries.items()]

    def entry_points(*, group: str) -> list[importlib.metadata.EntryPoint]:
        return [p for p in points if p.group == group]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_every_data_pipelines_module_with_a_run_is_declared_under_its_own_name():
    with_run = set()
    for info in pkgutil.iter_modules(data_pipelines.__path__):
        tree = ast.parse(Path(data_pipelines.__path__[0], f"{info.name}.py").read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body):
            with_run.add(info.name)
    assert declared_jobs() == {name: f"data_pipelines.{name}" for name in sorted(with_run)}


def test_the_installed_metadata_declares_the_same_jobs_as_pyproject():
    assert jobs.job_names() == sorted(declared_jobs()), (
        "the installed entry points differ from pyproject.toml: re-run `pip install -e .`")


def test_a_job_is_found_and_run_by_name_with_its_collaborators(tmp_path, monkeypatch):
    (tmp_path / "echo_job.py").write_text("def run(cfg, **collaborators):\n    return {'cfg': cfg, **collaborators}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "echo_job", raising=False)
    fake_registry(monkeypatch, {"echo": "echo_job", "other": "echo_job"})
    assert jobs.job_names() == ["echo", "other"]
    assert jobs.job_module("echo").__name__ == "echo_job"
    assert jobs.run_job("echo", {"a": 1}, runtime="r") == {"cfg": {"a": 1}, "runtime": "r"}


def test_an_unknown_job_names_the_registered_ones(monkeypatch):
    fake_registry(monkeypatch, {"tokenize": "data_pipelines.tokenize", "scoring": "data_pipelines.scoring"})
    with pytest.raises(jobs.DataJobError, match=r"unknown data job 'tokenise'; registered: \['scoring', 'tokenize'\]"):
        jobs.run_job("tokenise", {})


def test_no_registered_jobs_means_the_project_is_not_installed(monkeypatch):
    fake_registry(monkeypatch, {})
    with pytest.raises(jobs.DataJobError, match=r"no data jobs are registered.*pip install -e \."):
        jobs.job_names()


def test_a_registered_module_without_run_is_refused(monkeypatch):
    fake_registry(monkeypatch, {"codes": "lfm2_train.exit_codes"})
    with pytest.raises(jobs.DataJobError, match=r"'codes' \(lfm2_train.exit_codes\) has no run"):
        jobs.job_module("codes")


def test_a_registry_error_is_a_user_error():
    from lfm2_train.errors import USER_ERRORS

    assert issubclass(jobs.DataJobError, USER_ERRORS)


def test_every_job_a_chain_step_may_name_is_declared():
    from lfm2_train.chain.spec import DATA_JOBS

    assert set(DATA_JOBS) <= set(declared_jobs())
