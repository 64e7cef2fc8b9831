"""Structured (dataclass) configs registered with Hydra's ConfigStore.

A typo in a YAML file or on the command line is an error that names the key, because every node is
typed. The stage group selects what `python -m lfm2_train` runs.
"""

from .schema import GenerateStageConfig, RootConfig, register_configs

__all__ = ["GenerateStageConfig", "RootConfig", "register_configs"]
