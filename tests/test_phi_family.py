"""Every Phi card's shape through the chain: tiny random models of each card's real config kinds (LongRoPE, GQA,
partial rotary, tied embeddings, intermediate/hidden != 2), exported with the card's exporter and parity-checked,
and (slow tier) built into a cpu-int4 artifact. Figures: bench/results/phi-family-parity.md."""
from __future__ import annotations

import json

import pytest

from conftest import TINY_PHI, make_tiny_phi, make_tiny_phi3, tiny_recipe_file
from toolchain.config.shapes import PHI, param_count, phi3_config
from toolchain.config.catalog import get_card
from toolchain.stages.export import decoder as export_mod

CARDS = sorted(PHI)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(card):
        if card not in made:
            made[card] = make_tiny_phi(card, tmp_path_factory.mktemp(card))
        return made[card]
    return get


PUBLISHED_B = {"phi-3-mini": 3.82, "phi-3-mini-128k": 3.82, "phi-3.5-mini": 3.82, "phi-3-medium": 13.96,
               "phi-4-mini": 3.84}  # the Hub pages' safetensors parameter counts (from memory), billions


@pytest.mark.parametrize("card", CARDS)
def test_recorded_shape_counts_what_transformers_builds(card):
    """param_count from the config fields equals the parameters of the Phi3ForCausalLM transformers builds, and
    the published size."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = phi3_config(card)
    with torch.device("meta"):
        model = Phi3ForCausalLM(Phi3Config(**cfg))
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert round(param_count(cfg) / 1e9, 2) == PUBLISHED_B[card]
    assert export_mod.builder_cpu_attention_reason(cfg) is None  # every real Phi head fits the CPU kernel


@pytest.mark.parametrize("card", CARDS)
def test_tiny_model_keeps_the_real_kinds(card, tiny):
    real, cfg = PHI[card], json.loads((tiny(card) / "config.json").read_text())
    assert cfg["intermediate_size"] / cfg["hidden_size"] != 2
    assert cfg["intermediate_size"] / cfg["hidden_size"] == pytest.approx(
        real["intermediate_size"] / real["hidden_size"], rel=0.05)
    assert (cfg["num_key_value_heads"] < cfg["num_attention_heads"]) == (
        real["num_key_value_heads"] < real["num_attention_heads"])
    assert cfg["tie_word_embeddings"] == real["tie_word_embeddings"]
    assert cfg.get("partial_rotary_factor", 1.0) == real.get("partial_rotary_factor", 1.0)
    assert (cfg["max_position_embeddings"], cfg["original_max_position_embeddings"]) == (
        real["max_position_embeddings"], real["original_max_position_embeddings"])
    if real["rope_scaling"]:
        rope = cfg["rope_scaling"]
        head = cfg["hidden_size"] // cfg["num_attention_heads"]
        assert rope["type"] == "longrope"
        assert len(rope["short_factor"]) == len(rope["long_factor"]) == int(head * cfg.get("partial_rotary_factor", 1)) // 2
    else:
        assert cfg["rope_scaling"] is None
    # a vocabulary wider than any projection, as in the real models: the builder makes the right LM head
    assert cfg["vocab_size"] / cfg["hidden_size"] == pytest.approx(real["vocab_size"] / real["hidden_size"], rel=0.1)
    assert export_mod.builder_lm_head_clash(tiny(card)) == []


@pytest.mark.parametrize("card", CARDS)
def test_card_exporter_passes_parity_on_the_cards_shape(card, tiny, tmp_path):
    exporter = get_card(card).exporter
    rep = export_mod.export(tiny(card), tmp_path / "out", exporter=exporter)
    assert rep["exporter"] == exporter == "genai" and "fallback_reason" not in rep
    assert rep["parity"]["passed"] and rep["parity"]["max_abs_logit_diff"] <= 1e-5
    assert rep["parity"]["top1_agreement"] == 1.0


def test_attention_the_cpu_kernel_refuses_falls_back_to_optimum(tmp_path):
    """Phi-4-mini's kinds at head 32: partial rotary 0.75 makes a rotary width of 12, which ORT's CPU
    GroupQueryAttention refuses at run time; the export takes Optimum and says why."""
    kw = {**TINY_PHI["phi-4-mini"], "hidden_size": 96, "intermediate_size": 256}
    cfg = phi3_config("phi-4-mini", num_hidden_layers=2, **kw)
    assert "head_size 32, rotary width 12" in export_mod.builder_cpu_attention_reason(cfg)
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "bos_token_id",
                                                       "eos_token_id", "pad_token_id")}
    model = make_tiny_phi3(tmp_path / "h32", **keep)
    rep = export_mod.export(model, tmp_path / "out", exporter="genai")
    assert rep["exporter"] == "optimum" and rep["requested_exporter"] == "genai"
    assert "GroupQueryAttention" in rep["fallback_reason"] and rep["parity"]["passed"]
    # the builder's own graph does fail there, with the runtime's message, as a ToolchainError
    raw, work = tmp_path / "raw", tmp_path / "work"
    raw.mkdir(), work.mkdir()
    export_mod.export_genai(model, raw, "fp32", work, False)
    with pytest.raises(export_mod.ToolchainError, match="cannot run the exported model.*multiple of 8"):
        export_mod.check_parity(raw, model)


@pytest.mark.slow
@pytest.mark.parametrize("card", CARDS)
def test_card_shape_builds_a_cpu_int4_artifact(card, tiny, tmp_path):
    """The whole chain (finetune 4 steps, merge, export, reference, quantize, package, validate) on the card with
    its tiny weights (--model CARD --model-path DIR)."""
    from toolchain import pipeline

    rec = tiny_recipe_file(tmp_path, gates={})
    rep = pipeline.edge(card, str(rec), target="cpu-int4", out=tmp_path / "artifacts", model_path=str(tiny(card)))
    art = tmp_path / "artifacts" / f"{card}-chat-lora"
    ex = json.loads((art / "stages/export-genai/export_report.json").read_text())
    assert ex["exporter"] == "genai" and ex["parity"]["passed"]
    manifest = json.loads((art / "cpu-int4/manifest.json").read_text())
    assert manifest["target"]["exporter"] == "genai" and manifest["model_card"]["name"] == card
    assert rep["status"] == "passed" and rep["headline"]["size_mb"] > 0
