"""Recipes as a user changes them: a copy out of recipes/ finds its data, `toolchain recipes cp` writes one that runs
as is, and a missing data file is one clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from toolchain.config import catalog
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import sha256_file

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


# ------------------------------------------------------------------ own data: --data / --eval-data
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Perth", "Accra", "Lima", "Turin", "Bergen", "Cork", "Malmo", "Porto"]


def own_rows(n: int, offset: int = 0) -> str:
    """A handful of chat rows of our own: a ticket request in words, a one-line JSON answer."""
    rows = []
    for i in range(offset, offset + n):
        city, qty = CITIES[i % len(CITIES)], 1 + i % 4
        rows.append({"messages": [
            {"role": "user", "content": f"Two words: {qty} tickets to {city}, please."},
            {"role": "assistant", "content": json.dumps({"city": city, "qty": qty})}]})
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_open_recipe_with_own_data_holds_out_a_seeded_split_and_says_so(tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text(own_rows(12))
    loaded = catalog.open_recipe("chat-lora", data=str(mine))
    assert loaded.recipe.data.train == str(mine.resolve()) and loaded.recipe.data.eval is None
    assert loaded.overrides == (f"data.train={mine.resolve()}", "data.eval=null")
    assert "no --eval-data" in loaded.note and "seed 0 (train.seed)" in loaded.note and "0.1" in loaded.note
    held = tmp_path / "held.jsonl"
    held.write_text(own_rows(3, offset=5))
    loaded = catalog.open_recipe("chat-lora", data=str(mine), eval_data=str(held), max_steps=3)
    assert loaded.recipe.data.eval == str(held.resolve()) and loaded.note is None
    assert loaded.overrides[-1] == "train.max_steps=3" and loaded.recipe.train.max_steps == 3
    with pytest.raises(ToolchainError, match=r"^--eval-data nope\.jsonl: no such file"):
        catalog.open_recipe("chat-lora", data=str(mine), eval_data="nope.jsonl")


def test_edge_on_own_data_to_a_validated_artifact_and_a_changed_file_retrains(tiny_phi3, tmp_path, capsys):
    from conftest import tiny_recipe_file
    from toolchain import pipeline

    mine = tmp_path / "mine.jsonl"
    mine.write_text(own_rows(12))
    rec = tiny_recipe_file(tmp_path, gates={})
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int4", out=tmp_path / "artifacts", data=str(mine))
    assert rep["validated"] and rep["passed"] and rep["measured"]["perplexity"] > 0
    assert "holding out 0.1 of" in capsys.readouterr().err
    art = Path(rep["headline"]["artifact"])
    man = json.loads((art / "manifest.json").read_text())
    assert man["recipe"]["data"]["train"] == str(mine.resolve()) and man["recipe"]["data"]["eval"] is None
    assert man["inputs"]["data_files"] == {"data.train": {"path": str(mine.resolve()), "sha256": sha256_file(mine)}}
    assert len((art / "eval.jsonl").read_text().splitlines()) == 1  # 10% of 12 rows, held out of the user's file
    again = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int4", out=tmp_path / "artifacts", data=str(mine))
    assert again["headline"]["stages_reused"]["finetune"]
    mine.write_text(own_rows(12, offset=1))  # same size, other rows: the stage keys hash the content
    changed = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int4", out=tmp_path / "artifacts", data=str(mine))
    assert not changed["headline"]["stages_reused"]["finetune"] and changed["validated"]
    man = json.loads((art / "manifest.json").read_text())
    assert man["inputs"]["data_files"]["data.train"]["sha256"] == sha256_file(mine)


def test_cli_edge_with_own_train_and_eval_data(tiny_phi3, tmp_path):
    from conftest import tiny_recipe_file

    mine, held = tmp_path / "mine.jsonl", tmp_path / "held.jsonl"
    mine.write_text(own_rows(12))
    held.write_text(own_rows(4, offset=3))
    rec = tiny_recipe_file(tmp_path, gates={})
    out = tmp_path / "artifacts"
    r = run_cli("edge", "--model", str(tiny_phi3), "--recipe", str(rec), "--out", str(out), "--data", "mine.jsonl",
                "--eval-data", "held.jsonl", "--set", "method.r=4", "--set", "train.lr=5e-4",
                "--set", "gates.min_decode_tok_s=1", "--set", "train.bf16=off", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "artifact:" in r.stdout and "no --eval-data" not in r.stderr and "gate min_decode_tok_s" in r.stdout
    art = next(out.glob("*/cpu-int4"))
    man = json.loads((art / "manifest.json").read_text())
    assert set(man["inputs"]["data_files"]) == {"data.train", "data.eval"}
    assert man["inputs"]["data_files"]["data.eval"]["sha256"] == sha256_file(held)
    assert len((art / "eval.jsonl").read_text().splitlines()) == 4
    assert man["overrides"] == [f"data.train={mine}", f"data.eval={held}", "method.r=4", "train.lr=5e-4",
                                "gates.min_decode_tok_s=1", "train.bf16=off"]
    assert man["recipe"]["method"]["r"] == 4 and man["recipe"]["train"]["lr"] == 5e-4
    assert man["recipe"]["gates"]["min_decode_tok_s"] == 1 and man["recipe"]["train"]["bf16"] == "off"
    rep = json.loads((art / "report.json").read_text())
    assert [g["gate"] for g in rep["gates"]] == ["min_decode_tok_s"] and rep["passed"]


def test_bad_own_data_names_file_and_line_and_writes_nothing(tiny_phi3, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(own_rows(2) + '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    out = tmp_path / "artifacts"
    r = run_cli("edge", "--model", str(tiny_phi3), "--recipe", "chat-lora", "--out", str(out), "--data", str(bad))
    assert r.returncode == 2 and f"{bad}:3:" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
    r = run_cli("edge", "--model", str(tiny_phi3), "--recipe", "chat-lora", "--out", str(out), "--data", "nope.jsonl")
    assert r.returncode == 2 and "--data nope.jsonl: no such file" in r.stderr and not out.exists()


# ------------------------------------------------------------------ --set KEY=VALUE
def test_set_reaches_any_key_as_yaml_values_checked_by_the_schema(tmp_path):
    loaded = catalog.open_recipe("chat-lora", max_steps=7, sets=[
        "train.lr=5e-4", "method.r=8", "gates.min_metric_fraction=0.9", "train.bf16=on", "train.max_steps=3",
        "quantize.int8=[qkv_proj, o_proj]", "target=cpu-int8", "gates.min_decode_tok_s=null"])
    rec = loaded.recipe
    assert rec.train.lr == 5e-4 and rec.method.r == 8 and rec.gates.min_metric_fraction == 0.9
    assert rec.train.bf16 == "on"  # YAML reads `on` as true; the key holds text, so it takes the text
    assert rec.train.max_steps == 3  # --set comes after --max-steps
    assert rec.quantize.int8 == ["qkv_proj", "o_proj"] and rec.target == "cpu-int8"
    assert rec.gates.min_decode_tok_s is None and rec.gates.max_perplexity_increase_pct == 10
    assert loaded.overrides == ("train.max_steps=7", "train.lr=5e-4", "method.r=8", "gates.min_metric_fraction=0.9",
                                "train.bf16=on", "train.max_steps=3", 'quantize.int8=["qkv_proj", "o_proj"]',
                                "target=cpu-int8", "gates.min_decode_tok_s=null")
    again = catalog.open_recipe("chat-lora", sets=list(loaded.overrides))  # the recorded lines replay the change
    assert again.recipe == rec
    held = tmp_path / "held.jsonl"
    held.write_text(own_rows(2))
    rec = catalog.open_recipe("chat-lora", sets=[f"data.eval={held}"]).recipe
    assert rec.data.eval == str(held.resolve()) and rec.data.train.endswith("data/chat-lora/train.jsonl")


@pytest.mark.parametrize("item, message", [
    ("train.learning_rate=1e-3", "--set train.learning_rate=1e-3: unknown key 'train.learning_rate' (section 'train' "
                                 "has: max_steps, batch_size"),
    ("train.lr=-1", "--set train.lr=-1: key 'train.lr': Input should be greater than 0"),
    ("method.type=lorax", "--set method.type=lorax: key 'method.type': Input should be 'lora', 'qlora'"),
    ("quantize.block_size=48", "--set quantize.block_size=48: key 'quantize.block_size': Input should be 16, 32"),
    ("gates.min_metric_fraction=1.5", "--set gates.min_metric_fraction=1.5: key 'gates.min_metric_fraction': "
                                      "Input should be less than or equal to 1"),
    ("train.lr.x=1", "--set train.lr.x=1: 'train.lr' is a value, not a section"),
    ("nokey", "--set nokey: expected KEY=VALUE"),
    ("bogus=1", "--set bogus=1: unknown key 'bogus' (a recipe has: name, task"),
    ("data.train=nope.jsonl", "--set data.train=nope.jsonl: no such file"),
    ("train.lr=[1", "--set train.lr=[1: the value is not YAML"),
])
def test_bad_set_is_exit_2_naming_the_key_and_the_schema(item, message, tmp_path):
    out = tmp_path / "out"
    r = run_cli("edge", "--recipe", "chat-lora", "--out", str(out), "--set", "train.max_steps=2", "--set", item)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_finetune_takes_set_too(tiny_phi3, tmp_path):
    from conftest import tiny_recipe_file

    rec = tiny_recipe_file(tmp_path)
    r = run_cli("finetune", "--model", str(tiny_phi3), "--recipe", str(rec), "--out", str(tmp_path / "bad"),
                "--set", "method.alpha=0")
    assert r.returncode == 2 and "--set method.alpha=0: key 'method.alpha': Input should be greater than 0" in r.stderr
    out = tmp_path / "a"
    r = run_cli("finetune", "--model", str(tiny_phi3), "--recipe", str(rec), "--out", str(out), "--no-eval",
                "--set", "method.r=2", "--set", "train.max_steps=1")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["max_steps"] == 1
