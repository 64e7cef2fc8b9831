"""Where the Hydra config tree, the recipes and the packaged chains are, in a checkout and when installed.

The repository keeps them at its top level: `conf/` is the config tree and `recipes/` holds every recipe and
chain, with `conf/recipe` a symlink to `../recipes` because Hydra finds the `recipe` group as a directory of
that name. A wheel installs the same tree as the package `lfm2_train.conf` (`lfm2_train/conf/recipe/...`,
see pyproject.toml). Everything that composes a config or reads a recipe or chain file asks this module, so
the answer is the same from a checkout, an editable install and a wheel.

Recipes and chains share `recipes/`: a recipe is a `# @package _global_` file (it sets values across
groups); any other YAML there is a chain (`recipes/chains/<name>.yaml` can be named by `stage.chain=<name>`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]

RECIPE_HEADER = "# @package _global_"


def _conf_dir() -> Path:
    """The installed tree when there is one, else the repository's `conf/`. A leftover `lfm2_train/conf/`
    in a checkout (an old `__pycache__`) has no `recipe/`, so it does not count as installed."""
    installed = _PACKAGE / "conf"
    return installed if (installed / "recipe").is_dir() else _PACKAGE.parent / "conf"


CONF_DIR = _conf_dir()
RECIPE_DIR = (CONF_DIR / "recipe").resolve()  # the repository's recipes/ in a checkout
CHAIN_DIR = RECIPE_DIR / "chains"


def initialize_conf() -> AbstractContextManager:
    """`hydra.initialize_config_dir` on the config tree: compose `lfm2_train` outside `python -m lfm2_train`."""
    from hydra import initialize_config_dir

    return initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3")


def is_recipe(path: Path) -> bool:
    """A recipe starts with `# @package _global_`; a chain file under `recipes/` does not."""
    with path.open(encoding="utf-8") as fh:
        return fh.readline().strip() == RECIPE_HEADER


def recipe_files() -> list[Path]:
    """Every packaged recipe, sorted by name; chains are left out."""
    files = [p for p in RECIPE_DIR.rglob("*.yaml") if is_recipe(p)]
    return sorted(files, key=lambda p: p.relative_to(RECIPE_DIR).as_posix())


def recipe_names() -> list[str]:
    """Every `recipe=` choice, per-size ones included (`lfm2-350m/pretrain`)."""
    return [p.relative_to(RECIPE_DIR).with_suffix("").as_posix() for p in recipe_files()]


def recipe_path(name: str) -> Path | None:
    """The file behind `recipe=<name>`, or None when no packaged recipe has that name."""
    path = RECIPE_DIR / f"{name}.yaml"
    return path if path.is_file() and is_recipe(path) else None


def chain_path(name: str) -> Path:
    """The file behind `stage.chain=<name>` (it may not exist; the chain loader says so)."""
    return CHAIN_DIR / f"{name}.yaml"


def packaged_chains() -> list[Path]:
    """The chains `stage.chain=<name>` can name, sorted."""
    return sorted(CHAIN_DIR.glob("*.yaml")) if CHAIN_DIR.is_dir() else []
