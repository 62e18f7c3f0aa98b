"""A non-editable install works anywhere: the packages pyproject.toml lists are every package on disk, and a wheel
installed into a bare folder, run from outside the checkout, has its model cards, recipes and data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _setuptools_config() -> dict:
    from setuptools.config.pyprojecttoml import read_configuration  # reads TOML on 3.10 too (no tomllib there)

    return read_configuration(REPO / "pyproject.toml")["tool"]["setuptools"]


def test_every_toolchain_package_on_disk_is_listed():
    cfg = _setuptools_config()
    listed, mapped = set(cfg["packages"]), cfg["package-dir"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "toolchain").rglob("__init__.py")}
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    # the data packages: models/ and recipes/ at the top of the repository, installed inside the package
    assert mapped == {"toolchain.cards": "models", "toolchain.recipes": "recipes"}
    assert listed == on_disk | set(mapped)
    data = cfg["package-data"]
    assert all(list((REPO / mapped[pkg]).glob(pattern)) for pkg, patterns in data.items() for pattern in patterns)


def _probe(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_has_cards_recipes_and_validates(tiny_artifact, tmp_path):
    src, dist, target, elsewhere = (tmp_path / d for d in ("src", "dist", "target", "elsewhere"))
    src.mkdir()
    elsewhere.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("toolchain", "models", "recipes"):  # a clean copy: the build writes build/ and *.egg-info beside it
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], check=True)
    wheel = next(dist.glob("edge_toolchain-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    assert not (target / "toolchain" / "models").exists() and (target / "toolchain" / "cards").is_dir()

    where = _probe(target, elsewhere, "-c", "import json, sys, toolchain; from toolchain.config import catalog; "
                   "print(json.dumps([toolchain.__file__, sys.path, str(catalog.RECIPES_DIR)]))")
    assert where.returncode == 0, where.stderr
    module, path, recipes_dir = json.loads(where.stdout)
    assert Path(module).is_relative_to(target) and Path(recipes_dir) == target / "toolchain" / "recipes"
    assert not [p for p in path if p and Path(p).resolve() == REPO.resolve()], "the checkout is on sys.path"

    models = _probe(target, elsewhere, "-m", "toolchain", "models", "--json")
    assert models.returncode == 0, models.stderr
    assert {"smollm2-135m", "phi-3-mini", "minilm-l6"} <= {m["name"] for m in json.loads(models.stdout)}
    recipes = _probe(target, elsewhere, "-m", "toolchain", "recipes", "--json")
    assert recipes.returncode == 0, recipes.stderr
    assert {"chat-lora", "ner", "translate"} <= {r["name"] for r in json.loads(recipes.stdout)}

    art = tmp_path / "artifact"
    shutil.copytree(tiny_artifact[2]["headline"]["artifact"], art)
    for out in ("report.json", "report.md", "report.png"):
        (art / out).unlink(missing_ok=True)
    val = _probe(target, elsewhere, "-m", "toolchain", "validate", str(art), "--json")
    assert val.returncode == 0, val.stderr
    rep = json.loads(val.stdout)
    assert rep["validated"] and rep["measured"]["perplexity"] > 0
