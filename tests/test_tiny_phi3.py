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


def test_streaming_merge_equals_the_in_memory_merge(tiny_phi3, tiny_recipe, tmp_path):
    """A large base merges shard by shard in its own dtype (stages/merge.py): on an fp32 base that gives the same
    weights as peft's merge_and_unload; on a bf16 base the merged folder stays bf16 and the one-at-a-time parity
    check passes; an adapter for other weights is refused with nothing written."""
    import shutil

    from safetensors.torch import load_file, save_file

    ft = tmp_path / "ft"
    finetune(str(tiny_phi3), str(tiny_recipe), ft, evaluate=False)
    mem = merge(str(tiny_phi3), ft, tmp_path / "mem")
    assert "streamed" not in mem  # a tiny base merges in memory by default
    from toolchain.config.sources import resolve
    from toolchain.stages.merge import merge as run

    rep = run(resolve(str(tiny_phi3)), ft, tmp_path / "stream", stream=True)
    assert rep["streamed"] and rep["passed"] and rep["checked"] == "first 2 decoder layers in float32"
    a, b = load_file(tmp_path / "mem/model.safetensors"), load_file(tmp_path / "stream/model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6

    half = tmp_path / "bf16-base"
    shutil.copytree(tiny_phi3, half)
    w = {k: v.to(torch.bfloat16) for k, v in load_file(half / "model.safetensors").items()}
    save_file(w, half / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((half / "config.json").read_text())
    (half / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    rep = run(resolve(str(half)), ft, tmp_path / "stream-bf16", stream=True)
    assert rep["passed"] and rep["relative_diff"] < 1e-2 and rep["top1_agreement"] >= 0.95
    merged = load_file(tmp_path / "stream-bf16/model.safetensors")
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    assert not torch.equal(merged["model.layers.0.self_attn.qkv_proj.weight"], w["model.layers.0.self_attn.qkv_proj.weight"])

    other = tmp_path / "other-base"  # a base without the adapted weights' names
    shutil.copytree(tiny_phi3, other)
    w = load_file(other / "model.safetensors")
    save_file({k.replace("qkv_proj", "qkv"): v for k, v in w.items()}, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ToolchainError, match="not in the base"):
        run(resolve(str(other)), ft, tmp_path / "bad", stream=True)
    assert not (tmp_path / "bad").exists()
