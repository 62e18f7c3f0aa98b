"""Recipes as a user changes them: a copy out of recipes/ finds its data, `toolchain recipes cp` writes one that runs
as is, and a missing data file is one clear error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from toolchain.config import catalog
from toolchain.runtime.errors import ToolchainError

SHIPPED = REPO / "recipes"


def run_cli(*args, cwd=REPO):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "toolchain", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_a_copied_recipe_finds_data_beside_it_first_then_the_shipped_data(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text((SHIPPED / "chat-lora.yaml").read_text())  # data/chat-lora/... relative, no data beside it
    rec, f = catalog.load_recipe(str(copy))
    assert f == copy
    assert Path(rec.data.train) == (SHIPPED / "data/chat-lora/train.jsonl").resolve()
    assert Path(rec.data.eval) == (SHIPPED / "data/chat-lora/eval.jsonl").resolve()
    beside = tmp_path / "data/chat-lora/eval.jsonl"
    beside.parent.mkdir(parents=True)
    beside.write_text((SHIPPED / "data/chat-lora/eval.jsonl").read_text().splitlines()[0] + "\n")
    rec, _ = catalog.load_recipe(str(copy))
    assert Path(rec.data.eval) == beside.resolve()  # the recipe's own folder wins
    assert Path(rec.data.train) == (SHIPPED / "data/chat-lora/train.jsonl").resolve()


def test_missing_data_file_is_one_error_naming_recipe_key_and_both_places(tmp_path):
    rec = yaml.safe_load((SHIPPED / "chat-lora.yaml").read_text())
    rec["data"]["eval"] = "data/chat-lora/typo.jsonl"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(rec))
    with pytest.raises(ToolchainError) as e:
        catalog.load_recipe(str(bad))
    msg = str(e.value)
    assert msg.startswith(f"{bad}: key 'data.eval': data file 'data/chat-lora/typo.jsonl' not found")
    assert str(tmp_path / "data/chat-lora/typo.jsonl") in msg and str(SHIPPED / "data/chat-lora/typo.jsonl") in msg
    out = tmp_path / "out"
    r = run_cli("finetune", "--model", "smollm2-135m", "--recipe", str(bad), "--out", str(out))
    assert r.returncode == 2 and "key 'data.eval'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_recipes_cp_writes_a_copy_that_runs_as_is(tiny_phi3, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = run_cli("recipes", "cp", "chat-lora", "my.yaml", cwd=elsewhere)
    assert r.returncode == 0, r.stderr
    dest = elsewhere / "my.yaml"
    text = dest.read_text()
    assert "# held out: unseen names" in text and "toolchain recipes cp" in text  # the comments are kept
    raw = yaml.safe_load(text)
    assert Path(raw["data"]["train"]).is_absolute() and Path(raw["data"]["train"]).is_file()
    assert {k: v for k, v in raw.items() if k != "data"} == {
        k: v for k, v in yaml.safe_load((SHIPPED / "chat-lora.yaml").read_text()).items() if k != "data"}
    assert run_cli("recipes", "cp", "chat-lora", "my.yaml", cwd=elsewhere).returncode == 2  # no silent overwrite
    # moved elsewhere again, it still runs: the fine-tune reads its data from the absolute paths
    moved = tmp_path / "moved" / "renamed.yaml"
    moved.parent.mkdir()
    dest.rename(moved)
    out = tmp_path / "adapter"
    r = run_cli("finetune", "--model", str(tiny_phi3), "--recipe", str(moved), "--max-steps", "1", "--no-eval",
                "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["data"]["train"] == raw["data"]["train"]


def test_recipes_cp_copy_data_keeps_relative_paths(tmp_path):
    r = run_cli("recipes", "cp", "translate", str(tmp_path / "t"), "--copy-data")
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "t" / "translate.yaml"
    raw = yaml.safe_load(dest.read_text())
    assert raw["data"]["train"] == "data/translate/train.jsonl"
    assert (tmp_path / "t/data/translate/eval.jsonl").read_bytes() == (SHIPPED / "data/translate/eval.jsonl").read_bytes()
    rec, _ = catalog.load_recipe(str(dest))
    assert Path(rec.data.train) == (tmp_path / "t/data/translate/train.jsonl").resolve()
