"""`python -m lfm2_train stage=<name> [overrides]` — the Hydra entry point for every stage."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from .config import register_configs
from .stages import run_stage

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="lfm2_train")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
