"""`python -m lfm2_train stage=<name> [overrides]` — the Hydra entry point for every stage.

Exit codes (`exit_codes.py`): 0 finished; 2 a value, path or input to fix (one or two lines naming it;
`--verbose` or `HYDRA_FULL_ERROR=1` shows the traceback); 75 interrupted with a checkpoint written (run the
same command again to continue); anything else failed.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import register_configs
from .config.paths import CONF_DIR
from .config.validate import ConfigError, check_recipe_argument
from .errors import pop_verbose_flag, report
from .exit_codes import EXIT_INTERRUPTED
from .stages import run_stage

register_configs()


def _recipe_choice() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("recipe") if HydraConfig.initialized() else None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="lfm2_train")  # conf/ or lfm2_train/conf/
def main(cfg: DictConfig) -> None:
    try:
        result = run_stage(cfg, recipe=_recipe_choice())
    except Exception as err:  # noqa: BLE001 - `report` re-raises everything that is not a user error
        sys.exit(report(err))
    if isinstance(result, dict) and result.get("status") == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    pop_verbose_flag(sys.argv)
    try:
        check_recipe_argument(sys.argv[1:])
    except ConfigError as err:
        sys.exit(report(err))
    main()
