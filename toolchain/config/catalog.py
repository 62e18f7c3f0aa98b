"""Find model cards (models/*.yaml) and recipes (recipes/*.yaml) by name or path.

The repository keeps them at its top level; an installed package carries them inside itself as toolchain/cards and
toolchain/recipes (pyproject.toml's package-dir mapping), with the recipes' data and DeepSpeed configs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import yaml
from pydantic import ValidationError

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
GENERAL_DIR = RECIPES_DIR / "data" / "general"  # recipes/data/make_general.py: what a fine-tune must not forget
RETENTION_SET = GENERAL_DIR / "retention.jsonl"  # scored, never trained on
REPLAY_PROMPTS = GENERAL_DIR / "replay.jsonl"  # the default data.replay.prompts


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


DATA_KEYS = ("train", "eval")  # the recipe's data files, under data:


def data_file(rec_file: Path, key: str, value: str) -> Path:
    """A data path as the recipe file gives it: absolute, else relative to the recipe's folder, else to the shipped
    recipes folder (so a recipe copied out of recipes/ still finds data/...). One error names both places looked."""
    p = Path(value).expanduser()
    places = [p] if p.is_absolute() else list(dict.fromkeys([rec_file.parent / p, RECIPES_DIR / p]))
    for c in places:
        if c.is_file():
            return c.resolve()
    looked = " and ".join(str(c) for c in places)
    raise ToolchainError(f"{rec_file}: key 'data.{key}': data file '{value}' not found (looked for {looked}). Give a "
                         "path relative to the recipe's folder, or an absolute one (`toolchain recipes cp NAME DEST` "
                         "writes an editable copy whose data paths are absolute)")


def replay_prompts(rec: Recipe, rec_file: Path) -> Path:
    """The general prompts a decoder recipe replays (data.replay.prompts, else the shipped set)."""
    given = rec.data.replay.prompts
    return data_file(rec_file, "replay.prompts", given) if given else REPLAY_PROMPTS


@dataclass(frozen=True)
class LoadedRecipe:
    """A recipe as a run uses it: validated, data paths absolute, the command line's overrides applied."""
    recipe: Recipe
    file: Path  # the recipe's own file
    overrides: tuple[str, ...] = ()  # KEY=VALUE for every change the command line made, in the order applied
    note: Optional[str] = None  # what the user should know (said on stderr): --data without --eval-data holds out


def user_file(value, flag: str) -> str:
    """A data file named on the command line (`flag` as the user typed it, for the error): relative to the current
    folder, and it must exist."""
    p = Path(value).expanduser()
    if not p.is_file():
        raise ToolchainError(f"{flag}: no such file ({p.resolve()}); give a JSONL file (relative to the current "
                             "folder, or absolute)")
    return str(p.resolve())


def open_recipe(name_or_path: str, *, max_steps: Optional[int] = None, method: Optional[str] = None,
                data=None, eval_data=None, sets: Sequence[str] = ()) -> LoadedRecipe:
    """Load a recipe and apply the command line's overrides: the one place they are applied, so every stage, stage
    key and the manifest see the same recipe. In order: --data (train on this file; without --eval-data the eval
    split is then held out of it, data.eval_fraction seeded by train.seed), --eval-data, --max-steps, --method,
    then each --set KEY=VALUE (any recipe key by its dotted path; the value read as YAML; data.train/data.eval
    as files relative to the current folder). The schema checks the result; each problem names its flag."""
    path = recipe_path(name_or_path)
    d = load_yaml(path, Recipe).model_dump()
    for key in DATA_KEYS:
        if d["data"][key]:
            d["data"][key] = str(data_file(path, key, d["data"][key]))
    changes: list[_Change] = []
    if data is not None:
        changes.append(_Change("--data", "data.train", user_file(data, f"--data {data}")))
        if eval_data is None:
            changes.append(_Change("--data", "data.eval", None))  # the recipe's eval file goes with the recipe's data
    if eval_data is not None:
        changes.append(_Change("--eval-data", "data.eval", user_file(eval_data, f"--eval-data {eval_data}")))
    if max_steps:
        changes.append(_Change("--max-steps", "train.max_steps", max_steps))
    if method:
        changes.append(_Change("--method", "method.type", method))
    changes += [_parse_set(item) for item in sets]
    for c in changes:
        c.apply(d)
    rec = _validated(d, changes)
    note = None
    if data is not None and eval_data is None:
        note = (f"no --eval-data: holding out {rec.data.eval_fraction:g} of {data} (data.eval_fraction) to score on, "
                f"split with seed {rec.train.seed} (train.seed); pass --eval-data FILE to score on your own")
    return LoadedRecipe(rec, path, tuple(c.line() for c in changes), note)


def load_recipe(name_or_path: str, max_steps: Optional[int] = None, method: Optional[str] = None,
                data=None, eval_data=None, sets: Sequence[str] = ()) -> tuple[Recipe, Path]:
    """open_recipe's recipe and file."""
    r = open_recipe(name_or_path, max_steps=max_steps, method=method, data=data, eval_data=eval_data, sets=sets)
    return r.recipe, r.file


@dataclass
class _Change:
    """One override: the flag that asked for it (errors name it), the dotted recipe key, the value. `text`: a
    --set value as typed, which a text key takes as is (--set train.bf16=on is "on", though YAML reads True)."""
    flag: str
    key: str
    value: object
    text: Optional[str] = None

    def apply(self, d: dict) -> None:
        """Set the key in the recipe mapping; every key the schema knows is there (model_dump fills defaults)."""
        *parents, leaf = self.key.split(".")
        node, path = d, []
        for part in parents + [leaf]:
            if not isinstance(node, dict):
                raise ToolchainError(f"{self.flag}: '{'.'.join(path)}' is a value, not a section; it has no key '{part}'")
            if part not in node:
                where = f"section '{'.'.join(path)}'" if path else "a recipe"
                raise ToolchainError(f"{self.flag}: unknown key '{self.key}' ({where} has: {', '.join(node)})")
            if part != leaf:
                node, path = node[part], path + [part]
        if self.text is not None and isinstance(node[leaf], str) and self.value is not None \
                and not isinstance(self.value, str):
            self.value = self.text
        node[leaf] = self.value

    def covers(self, loc: list[str]) -> bool:
        return loc[: len(self.key.split("."))] == self.key.split(".")

    def line(self) -> str:
        """KEY=VALUE as the manifest records it (YAML reads JSON, so `--set LINE` makes the same change)."""
        return f"{self.key}={self.value if isinstance(self.value, str) else json.dumps(self.value)}"


def _parse_set(item: str) -> _Change:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ToolchainError(f"--set {item}: expected KEY=VALUE with KEY a dotted recipe path, e.g. --set train.lr=5e-4")
    flag = f"--set {key}={text}"
    if key in (f"data.{k}" for k in DATA_KEYS) and text.strip() not in ("", "null", "~"):
        return _Change(flag, key, user_file(text, flag))
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ToolchainError(f"{flag}: the value is not YAML ({getattr(e, 'problem', e)})") from None
    return _Change(flag, key, value, text)


def _validated(d: dict, changes: list[_Change]) -> Recipe:
    """The recipe schema's verdict on the changed recipe, each problem named by the flag that caused it."""
    try:
        return Recipe.model_validate(d)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            flag = next((c.flag for c in reversed(changes) if c.covers(loc)), "recipe")
            what = "unknown key (check the spelling against the schema)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{flag}: key '{'.'.join(loc)}': {what}")
        raise ToolchainError("\n".join(lines)) from None


def copy_recipe(name_or_path: str, dest: Path, copy_data: bool = False, force: bool = False) -> Path:
    """An editable copy of a recipe at `dest` (a .yaml file, or a folder to put NAME.yaml in) that runs as is from
    anywhere: its data paths made absolute, or with copy_data the data files copied beside it under the same
    relative paths. The recipe's comments are kept. Returns the file written."""
    import shutil

    src = recipe_path(name_or_path)
    dest = Path(dest)
    if dest.suffix not in (".yaml", ".yml"):
        dest = dest / src.name
    if dest.exists() and not force:
        raise ToolchainError(f"{dest}: already exists; pass --force to replace it, or give another DEST")
    rec = load_yaml(src, Recipe)
    text = src.read_text()
    files = {k: data_file(src, k, getattr(rec.data, k)) for k in DATA_KEYS if getattr(rec.data, k)}
    if copy_data:
        want = {}
        for k, f in files.items():
            rel = Path(getattr(rec.data, k))
            if rel.is_absolute() or ".." in rel.parts:
                rel = Path("data") / f.name
            want[k] = rel
    else:
        want = files
    text = _with_data_paths(text, {k: str(v) for k, v in want.items()})
    check = yaml.safe_load(text)
    if not all(check.get("data", {}).get(k) == str(v) for k, v in want.items()):  # a layout the line edit missed
        raw = yaml.safe_load(src.read_text())
        raw["data"].update({k: str(v) for k, v in want.items()})
        text = f"# Copied from {src} by `toolchain recipes cp`.\n" + yaml.safe_dump(raw, sort_keys=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if copy_data:
        for k, f in files.items():
            (dest.parent / want[k]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest.parent / want[k])
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(text)
    tmp.replace(dest)
    return dest


def _with_data_paths(text: str, paths: dict[str, str]) -> str:
    """The recipe text with data.train / data.eval set to `paths`, line by line so the comments stay."""
    out, in_data = [], False
    for line in text.splitlines(keepends=True):
        if line.strip() and not line[0].isspace() and not line.lstrip().startswith("#"):
            in_data = line.split(":", 1)[0].strip() == "data"
        m = re.match(r"^(\s+)(train|eval)(\s*:\s*)([^#\n]*?)(\s*#.*)?(\n?)$", line) if in_data else None
        if m and m.group(2) in paths:
            value = json.dumps(paths[m.group(2)])  # a JSON string is a YAML string: quoted, whatever the path holds
            line = f"{m.group(1)}{m.group(2)}{m.group(3)}{value}{m.group(5) or ''}{m.group(6)}"
        out.append(line)
    return "".join(out)


def all_recipes() -> dict[str, Recipe]:
    return {p.stem: load_yaml(p, Recipe) for p in sorted(_present(RECIPES_DIR, "recipes").glob("*.yaml"))}
