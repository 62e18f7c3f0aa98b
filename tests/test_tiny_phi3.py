"""A tiny random Phi-3 through finetune and merge: adapter format, determinism, merge parity."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO
from toolchain.runtime.errors import ToolchainError
from conftest import finetune
from toolchain.hf.models import load_causal_lm, load_tokenizer
from conftest import merge


def test_finetune_then_merge(tiny_phi3, tiny_recipe, tmp_path):
    ft = tmp_path / "ft"
    res = finetune(str(tiny_phi3), str(tiny_recipe), ft)
    assert (ft / "adapter/adapter_model.safetensors").is_file()
    cfg = json.loads((ft / "adapter/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
    assert set(cfg["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # from the phi-3 cards
    log = [json.loads(x) for x in (ft / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert res["tuned"]["eval_loss"] < res["base"]["eval_loss"]
    assert 0.0 <= res["tuned"]["exact_match"] <= 1.0 and res["tuned"]["eval_examples"] == 8

    # the same seed gives the same losses
    again = finetune(str(tiny_phi3), str(tiny_recipe), tmp_path / "ft2", evaluate=False)
    assert again["train"]["final_loss"] == res["train"]["final_loss"]

    rep = merge(str(tiny_phi3), ft, tmp_path / "merged")
    assert rep["passed"] and rep["max_abs_logit_diff"] <= 1e-3
    merged = load_causal_lm(tmp_path / "merged")
    assert merged.config.model_type == "phi3"
    assert (tmp_path / "merged/model.safetensors").is_file() and (tmp_path / "merged/tokenizer.json").is_file()
    assert "<|assistant|>" in load_tokenizer(tmp_path / "merged").chat_template
    base = load_causal_lm(tiny_phi3)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(base(ids).logits, merged(ids).logits)  # the merge changed the weights


def test_merge_refuses_quantized_base_and_bad_adapter(tiny_phi3, tmp_path):
    with pytest.raises(ToolchainError, match="no adapter_config.json"):
        merge(str(tiny_phi3), tmp_path, tmp_path / "m")
    q = tmp_path / "qbase"
    q.mkdir()
    cfg = json.loads((tiny_phi3 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (q / "config.json").write_text(json.dumps(cfg))
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text("{}")
    with pytest.raises(ToolchainError, match="merge into the full-precision base"):
        merge(str(q), ad, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_loss_on_trained_positions_equals_the_models_loss(tiny_phi3):
    from toolchain.hf import data
    from toolchain.stages.finetune.batching import causal_lm_loss
    from toolchain.hf.models import collate

    tok = load_tokenizer(tiny_phi3)
    rows = data.read_jsonl(REPO / "recipes/data/chat-lora/train.jsonl")[:4]
    batch = collate([data.encode(r, tok, 192) for r in rows], tok.pad_token_id)
    model = load_causal_lm(tiny_phi3)
    with torch.no_grad():
        assert causal_lm_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
