"""`python -m lfm2_train stage=<name> [overrides]` — the Hydra entry point for every stage.

Exit codes (`exit_codes.py`): 0 finished, 75 interrupted with a checkpoint written (run the same command
again to continue), anything else failed.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from .config import register_configs
from .exit_codes import EXIT_INTERRUPTED
from .stages import run_stage

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="lfm2_train")
def main(cfg: DictConfig) -> None:
    result = run_stage(cfg)
    if isinstance(result, dict) and result.get("status") == "interrupted":
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
