"""The entry point every data job shares: `python -m data_pipelines.<job> key=value ...`.

A job module holds a config dataclass and `run(cfg) -> dict`, and declares itself once:

    JOB = DataJob("scoring", ScoringConfig, run)
    register_configs, main = JOB.register_configs, JOB.main

`main` registers the config with Hydra's ConfigStore, parses the command line against it (a typo in a key
is an error naming it), runs the job and prints its summary as JSON. Errors a person must fix (a bad value,
a missing file, data made for another tokenizer) print as `error: <message>` and exit 2, exactly as
`python -m lfm2_train` does; anything else is a bug and keeps its traceback. `--verbose` (or
`HYDRA_FULL_ERROR=1`) shows the traceback of every error.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig


def _everything(result: Any) -> Any:
    return result


@dataclass(frozen=True)
class DataJob:
    """One offline job: its config name (also its module name), its config schema and its function."""

    name: str
    schema: type
    run: Callable[..., Any]
    summary: Callable[[Any], Any] = _everything  # what `main` prints, as JSON, from `run`'s result

    def register_configs(self) -> None:
        """Store the schema as the primary config `name` in Hydra's ConfigStore."""
        from hydra.core.config_store import ConfigStore

        ConfigStore.instance().store(name=self.name, node=self.schema)

    def main(self) -> None:
        """Run the job from the command line (`sys.argv[1:]` are Hydra overrides)."""
        import hydra

        if "--verbose" in sys.argv:  # imported only when asked: lfm2_train.errors loads torch
            from lfm2_train.errors import pop_verbose_flag

            pop_verbose_flag(sys.argv)
        self.register_configs()

        # Wrapping `run` makes Hydra name the task (log file, --help) after the job's module, not this one.
        @functools.wraps(self.run)
        def task(cfg: DictConfig) -> None:
            try:
                result = self.run(cfg)
            except Exception as err:  # noqa: BLE001 - `report` re-raises everything that is not a user error
                from lfm2_train.errors import report

                sys.exit(report(err))
            print(json.dumps(self.summary(result), indent=2))

        hydra.main(version_base="1.3", config_path=None, config_name=self.name)(task)()


def without(*keys: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    """A `summary` that prints the result less bulky `keys` (the full result is still returned by `run`)."""
    return lambda result: {k: v for k, v in result.items() if k not in keys}
