"""The wheel carries the whole config tree: conf/ and recipes/ sit at the top of the repository and install as
`lfm2_train/conf/` (pyproject.toml maps them), so a missing package or package-data rule fails here rather
than as "Could not find 'recipe/...'" after someone's `pip install .`."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
# What a build reads; everything else in a checkout (tests, docs, outputs) stays out of the copy.
BUILD_INPUTS = ("pyproject.toml", "README.md", "lfm2_train", "data_pipelines", "conf", "recipes")
# Where each top-level directory lands in the wheel (conf/recipe is the symlink to recipes/, not a copy).
INSTALLED_AS = {"conf": "lfm2_train/conf", "recipes": "lfm2_train/conf/recipe"}


def _setuptools_config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _files(top: str) -> list[str]:
    """Files under a top-level directory, relative to it, without following conf/recipe or caches."""
    root = REPO / top
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not (Path(dirpath) / d).is_symlink()]
        out += [(Path(dirpath) / f).relative_to(root).as_posix() for f in filenames if not f.endswith(".pyc")]
    return sorted(out)


def test_conf_recipe_is_the_recipes_directory():
    """Hydra finds the `recipe` group as conf/recipe/ in a checkout and an editable install."""
    link = REPO / "conf" / "recipe"
    assert link.is_symlink() and link.resolve() == (REPO / "recipes").resolve()
    assert _setuptools_config()["package-dir"] == {"lfm2_train.conf": "conf", "lfm2_train.conf.recipe": "recipes"}


def test_every_package_directory_is_listed():
    """`packages` is written out by hand (a package-dir mapping rules out `packages.find`): a new
    subpackage that is not listed would be left out of the wheel."""
    code = find_namespace_packages(str(REPO), include=["lfm2_train*", "data_pipelines*"])
    recipes = [d for d in find_namespace_packages(str(REPO / "recipes")) if all(map(str.isidentifier, d.split(".")))]
    expected = {*code, "lfm2_train.conf", "lfm2_train.conf.recipe", *(f"lfm2_train.conf.recipe.{d}" for d in recipes)}
    listed = _setuptools_config()["packages"]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    missing, stale = sorted(expected - set(listed)), sorted(set(listed) - expected)
    assert not missing and not stale, f"pyproject.toml packages: add {missing}, remove {stale}"


def _build_wheel(out: Path) -> Path:
    """Build from a copy of the build inputs, so no stale build/ directory of the checkout leaks in."""
    src = out / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "-q", "-w", str(out / "dist"), str(src)]
    try:  # offline with the installed setuptools when it builds wheels by itself (70.1+), else pip's isolated build
        version = importlib.metadata.version("setuptools").split(".")
        isolated = (int(version[0]), int(version[1])) < (70, 1)
    except (importlib.metadata.PackageNotFoundError, ValueError, IndexError):
        isolated = True
    if isolated:
        cmd.remove("--no-index")
    else:
        cmd.insert(4, "--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = (out / "dist").glob("lfm2_train-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_holds_conf_and_recipes_and_composes_a_recipe_from_anywhere(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())

    for top, installed in INSTALLED_AS.items():
        expected = {f"{installed}/{f}" for f in _files(top)}
        assert expected <= names, f"{top}/ files missing from the wheel: {sorted(expected - names)}"
    shipped = {n for n in names if n.startswith("lfm2_train/conf/")}
    assert shipped == {f"{inst}/{f}" for top, inst in INSTALLED_AS.items() for f in _files(top)}
    code = {f"{top}/{f}" for top in ("lfm2_train", "data_pipelines") for f in _files(top) if f.endswith(".py")}
    assert code <= names, f"modules missing from the wheel: {sorted(code - names)}"

    # Installed outside the checkout and run from an empty directory, the packaged tree is all there is.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    probe = (
        "import lfm2_train\n"
        "from hydra import compose\n"
        "from lfm2_train.chain.spec import load_chain\n"
        "from lfm2_train.config import register_configs\n"
        "from lfm2_train.config.paths import initialize_conf\n"
        "register_configs()\n"
        "with initialize_conf():\n"
        "    cfg = compose(config_name='lfm2_train', overrides=['recipe=lfm2-1.2b/pretrain'])\n"
        "print(lfm2_train.__file__, cfg.model.preset, cfg.data.seq_len, len(load_chain('tiny').steps))\n"
    )
    run = tmp_path / "cwd"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=run, env=env, check=True, capture_output=True,
                         text=True, timeout=300).stdout.split()
    assert Path(out[0]).is_relative_to(site)
    assert out[1:3] == ["lfm2-1.2b", "4096"] and int(out[3]) > 0
