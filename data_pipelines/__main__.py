"""`python -m data_pipelines <job> key=value ...`: any data job by name; without one, the list of jobs.

The same as `python -m data_pipelines.<job> key=value ...`. A job is a module of this package that
declares a `JOB` (`_job.DataJob`); the list is found by importing them, so a new job needs no entry here.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from types import ModuleType

import data_pipelines
from data_pipelines._job import DataJob

USAGE = "usage: python -m data_pipelines <job> [key=value ...]"


def _job_module(name: str) -> ModuleType | None:
    try:
        module = importlib.import_module(f"data_pipelines.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"data_pipelines.{name}":
            return None
        raise
    return module if isinstance(getattr(module, "JOB", None), DataJob) else None


def jobs() -> dict[str, str]:
    """Job name -> the first line of its module's docstring."""
    out = {}
    for info in pkgutil.iter_modules(data_pipelines.__path__):
        if info.name.startswith("_"):
            continue
        module = _job_module(info.name)
        if module is not None:
            out[info.name] = (module.__doc__ or "").strip().partition("\n")[0]
    return dict(sorted(out.items()))


def main(argv: list[str]) -> int:
    """Dispatch `argv` (`sys.argv` less the program) to a job's `main`; return an exit code otherwise."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\njobs:")
        for name, about in jobs().items():
            print(f"  {name:<18} {about}")
        return 0 if argv else 2
    name = argv[0]
    module = None if name.startswith("_") else _job_module(name)
    if module is None:
        print(f"error: {name!r} is not a data job; jobs: {', '.join(jobs())}", file=sys.stderr)
        return 2
    sys.argv = [f"{sys.argv[0]} {name}", *argv[1:]]
    module.JOB.main()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
