"""Data jobs, found by name.

The offline jobs (`data_pipelines`) are a layer above this library: they import it, it never imports them.
Where the library needs one (a chain step, the config reference, the bundled corpus behind `data.path=null`)
it looks it up here, in the `lfm2_train.data_jobs` entry-point group the installed distribution declares
(`[project.entry-points."lfm2_train.data_jobs"]` in pyproject.toml). A job is a module with a
`run(cfg, **collaborators)` that returns a summary dict; collaborators are objects a config cannot hold (a
runtime, a judge, a sampling function).
"""

from __future__ import annotations

import importlib.metadata
from types import ModuleType
from typing import Any

GROUP = "lfm2_train.data_jobs"


class DataJobError(ValueError):
    """No job by that name, or none registered at all. A ValueError: the command line shows it as a user
    error (a misspelt job, an uninstalled project), not as a traceback."""


def _registered() -> dict[str, importlib.metadata.EntryPoint]:
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    if not found:
        raise DataJobError(f"no data jobs are registered (the entry-point group {GROUP!r} is empty): install the "
                           "project (`pip install -e .` in the repository) so that data_pipelines' jobs are found")
    return found


def job_names() -> list[str]:
    """The registered jobs, sorted by name. Raises `DataJobError` when there are none (not installed)."""
    return sorted(_registered())


def job_module(name: str) -> ModuleType:
    """The module of job `name`, imported on first use."""
    registered = _registered()
    if name not in registered:
        raise DataJobError(f"unknown data job {name!r}; registered: {sorted(registered)}")
    module = registered[name].load()
    if not callable(getattr(module, "run", None)):
        raise DataJobError(f"data job {name!r} ({registered[name].value}) has no run(cfg)")
    return module


def run_job(name: str, cfg: Any, **collaborators: Any) -> Any:
    """Run job `name` with its config (a dict, a DictConfig or the job's dataclass) and return its summary."""
    return job_module(name).run(cfg, **collaborators)
