"""The Hydra config tree, installed as the package `lfm2_train.conf` (see pyproject.toml).

The config groups (`stage`, `model`, `data`, `optim`, `trainer`, `distributed`, `logger`) are structured configs
registered from `lfm2_train/config/schema.py`; the `recipe` group is the repository's `recipes/` directory,
linked here as `recipe/` because Hydra finds a group as a directory of that name.
"""
