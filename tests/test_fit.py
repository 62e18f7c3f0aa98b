"""The pre-flight fit check (config/fit.py): a run that will not fit stops before any stage, with the fix named."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_recipe_file
from toolchain.config import fit
from toolchain.config.catalog import load_recipe
from toolchain.config.schema import Launch
from toolchain.config.shapes import phi3_config
from toolchain.runtime.errors import ToolchainError

GB = fit.GB
# Llama-3.1-405B's shape: no machine the tests run on holds it
HUGE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248,
        "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}


@pytest.fixture
def mini(tmp_path):
    d = tmp_path / "phi-3-mini-config"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(phi3_config("phi-3-mini")))
    return d


def recipe(**method):
    rec, _ = load_recipe("chat-lora")
    return rec.model_copy(update={"method": rec.method.model_copy(update=method)}) if method else rec


def test_huge_config_exits_2_before_writing_anything(tmp_path):
    model = tmp_path / "huge"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HUGE))  # only a config: no stage may get as far as the weights
    rec = tiny_recipe_file(tmp_path)
    out = tmp_path / "artifacts"
    r = subprocess.run([sys.executable, "-m", "toolchain", "edge", "--model", str(model), "--recipe", str(rec),
                        "--target", "cpu-int4", "--out", str(out)], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "will not fit: the finetune stage needs about" in line and "GB is available" in line
    assert "QLoRA (--method qlora)" in line and "--launcher deepspeed --zero 3" in line and "--no-fit-check" in line
    assert not out.exists()


def test_first_stage_over_the_ram_is_named_with_its_fixes(mini, tmp_path):
    # Phi-3-mini takes the large-model path (7.6 GB of bf16 weights, never an fp32 copy): LoRA on its bf16 base with
    # chat-lora's batch needs over 8 GB
    with pytest.raises(ToolchainError, match=r"the finetune stage needs about \d+\.\d GB of RAM \(lora on a bf16 base.*"
                                             r"3\.82B parameters\) but 8\.0 GB is available; fixes: QLoRA"):
        fit.check_fit(mini, recipe(), "cpu-int4", tmp_path, available=8 * GB, free=1000 * GB)
    # QLoRA at batch 1 trains in far less, but before training the bf16 base answers the replay prompts (Phi-3-mini
    # held 8.2 GB doing so), which QLoRA does not shrink
    qlora_1 = recipe(type="qlora").model_copy(update={"train": recipe().train.model_copy(update={"batch_size": 1})})
    with pytest.raises(ToolchainError, match=r"the finetune stage needs .*before training, the base answers the "
                                             r"replay and held-out prompts in its own dtype") as e:
        fit.check_fit(mini, qlora_1, "cpu-int4", tmp_path, available=8 * GB, free=1000 * GB)
    assert "QLoRA" not in str(e.value).split("fixes:")[1] and "a machine with at least" in str(e.value)
    needs = {n.stage: n.ram for n in fit.estimate(phi3_config("phi-3-mini"), qlora_1, "cpu-int4")}
    assert needs["finetune"] > needs["reference"] > needs["merge"]  # that generation is the run's peak
    # and on 24 GB, the shipped chat-lora recipe fits every stage, the largest under 16 GB
    needs = fit.check_fit(mini, recipe(), "cpu-int4", tmp_path, available=22 * GB, free=1000 * GB)
    assert max(n.ram for n in needs) < 16 * GB


def test_disk_is_checked_at_out(mini, tmp_path):
    with pytest.raises(ToolchainError, match=r"the stages write about \d+\.\d GB under .* but 1\.0 GB is free"):
        fit.check_fit(mini, recipe(), "cpu-int4", tmp_path / "not" / "yet", available=1000 * GB, free=1 * GB)
    needs = fit.check_fit(mini, recipe(), "cpu-int4", tmp_path / "not" / "yet", available=1000 * GB, free=1000 * GB)
    assert [n.stage for n in needs] == ["finetune", "merge", "reference", "quantize", "package", "validate"]  # no export
    assert fit.disk_free(tmp_path / "not" / "yet") > 0  # the nearest existing parent's file system


def test_the_estimate_moves_with_the_settings_that_change_memory():
    cfg = phi3_config("phi-3-mini")

    def ft(rec, launch=Launch(), target="cpu-int4"):
        return {n.stage: n for n in fit.estimate(cfg, rec, target, launch)}["finetune"].ram

    base = recipe()
    assert ft(recipe(type="qlora")) < ft(base) < ft(recipe(type="full"))
    checkpointed = base.model_copy(update={"train": base.train.model_copy(update={"gradient_checkpointing": True})})
    assert ft(checkpointed) < ft(base)
    shorter = base.model_copy(update={"data": base.data.model_copy(update={"max_length": 64})})
    assert ft(shorter) < ft(base)
    # ZeRO-2 ranks each hold the base; ZeRO-3 over two nodes shards it
    two_ranks = Launch(launcher="deepspeed", nproc=2, zero=2)
    assert ft(base, two_ranks) > ft(base)
    assert ft(base, Launch(launcher="deepspeed", nproc=1, zero=3, nnodes=2)) < ft(base)
    by_target = {t: {n.stage: n for n in fit.estimate(cfg, base, t)}["package"].disk
                 for t in ("cpu-int4", "cpu-int8", "cpu-fp32")}
    assert by_target["cpu-int4"] < by_target["cpu-int8"] < by_target["cpu-fp32"]


def test_tiny_model_fits(tiny_phi3, tmp_path):
    needs = fit.check_fit(tiny_phi3, recipe(), "cpu-int4", tmp_path)  # this machine's MemAvailable and disk
    assert max(n.ram for n in needs) < 2 * GB and sum(n.disk for n in needs) < 0.1 * GB


def test_unreadable_config_is_a_clear_error(tmp_path):
    with pytest.raises(ToolchainError, match="cannot read the model's config for the fit check"):
        fit.check_fit(tmp_path, recipe(), "cpu-int4", tmp_path)
