"""Find model cards (models/*.yaml) and recipes (recipes/*.yaml) by name or path.

The repository keeps them at its top level; an installed package carries them inside itself as toolchain/cards and
toolchain/recipes (pyproject.toml's package-dir mapping), with the recipes' data and DeepSpeed configs.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Optional

from toolchain.runtime.errors import ToolchainError
from toolchain.config.schema import ModelCard, Recipe, load_yaml


def _shipped(installed: str, checkout: str) -> Path:
    """The folder inside the installed package; in a checkout that was never installed (or was installed editable,
    where the package is the source tree) the repository's own top-level folder."""
    inside = Path(str(resources.files("toolchain") / installed))
    if inside.is_dir():
        return inside
    source = Path(__file__).resolve().parents[2] / checkout
    return source if source.is_dir() else inside


MODELS_DIR = _shipped("cards", "models")
RECIPES_DIR = _shipped("recipes", "recipes")


def _present(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise ToolchainError(f"{folder}: the {what} are missing from this installation; reinstall edge-toolchain "
                             "(pip install .) or run from a checkout of the repository")
    return folder


def home() -> Path:
    """Where converted weights and the stage cache live (override with TOOLCHAIN_HOME)."""
    return Path(os.environ.get("TOOLCHAIN_HOME", Path.home() / ".cache" / "edge-toolchain"))


def all_cards() -> dict[str, ModelCard]:
    out = {}
    for p in sorted(_present(MODELS_DIR, "model cards").glob("*.yaml")):
        card = load_yaml(p, ModelCard)
        if card.name != p.stem:
            raise ToolchainError(f"{p}: key 'name' is '{card.name}' but the file is {p.name}; make them match")
        out[card.name] = card
    return out


def get_card(name: str) -> ModelCard:
    cards = all_cards()
    if name not in cards:
        raise ToolchainError(
            f"unknown model '{name}'. Known cards: {', '.join(cards)}. "
            f"Or pass a local HF folder path instead of a name."
        )
    return cards[name]


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ToolchainError(f"{p}: recipe file not found")
        return p
    p = _present(RECIPES_DIR, "recipes") / f"{name_or_path}.yaml"
    if not p.is_file():
        known = ", ".join(sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")))
        raise ToolchainError(f"unknown recipe '{name_or_path}'. Known recipes: {known}. Or pass a path to a .yaml file.")
    return p


def load_recipe(name_or_path: str, max_steps: Optional[int] = None, method: Optional[str] = None) -> tuple[Recipe, Path]:
    """The validated recipe and its file (data paths are relative to the file's folder), with the command line's
    overrides applied: the one place they are, so every stage, stage key and the manifest see the same recipe."""
    path = recipe_path(name_or_path)
    rec = load_yaml(path, Recipe)
    if max_steps:
        rec.train.max_steps = max_steps
    if method:
        rec.method.type = method
    return Recipe.model_validate(rec.model_dump()), path


def all_recipes() -> dict[str, Recipe]:
    return {p.stem: load_yaml(p, Recipe) for p in sorted(_present(RECIPES_DIR, "recipes").glob("*.yaml"))}
