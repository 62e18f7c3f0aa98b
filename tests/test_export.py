"""The export stage on a tiny random Phi-3: both exporters, fp32 parity, and onnxruntime-genai loading and generating."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toolchain.stages.export import decoder as export_mod
from toolchain.runtime.errors import ToolchainError
from toolchain.stages.export.decoder import export
from toolchain.hf.models import load_causal_lm, load_tokenizer

STRINGS = ["Hello world", "Book 2 seats in Oslo for 3 May. Name: Ana Lee.", "<|user|>\nhi<|end|>\n<|assistant|>\n",
           " leading space,  double  spaces\n\nand 12345"]


@pytest.mark.parametrize("exporter", ["genai", "optimum"])
def test_export_loads_generates_and_matches_torch(tiny_phi3, tmp_path, exporter):
    import onnxruntime_genai as og

    out = tmp_path / exporter
    rep = export(tiny_phi3, out, exporter=exporter)
    assert rep["exporter"] == exporter and rep["precision"] == "fp32"
    par = rep["parity"]
    assert par["passed"] and par["max_abs_logit_diff"] <= 1e-5 and par["top1_agreement"] == 1.0
    assert par["positions"] > 3 * export_mod.DECODE_STEPS and par["tokenizer_ids_match"]
    assert json.loads((out / "export_report.json").read_text()) == rep
    for f in ("model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert cfg["type"] == "phi3" and cfg["decoder"]["num_hidden_layers"] == 2 and cfg["eos_token_id"] == 4
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind

    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    hf_tok = load_tokenizer(tiny_phi3)
    for s in STRINGS:
        assert [int(x) for x in tok.encode(s)] == hf_tok(s)["input_ids"], s
    msgs = json.dumps([{"role": "user", "content": "Write a haiku about the sea."}])
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == hf_tok.apply_chat_template(json.loads(msgs), tokenize=False, add_generation_prompt=True)

    # greedy generation through the KV cache gives torch's greedy tokens
    ids = [int(x) for x in tok.encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + 6, min_length=len(ids) + 6)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    new = []
    while not gen.is_done():
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    hf = load_causal_lm(tiny_phi3)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)[0, len(ids):].tolist()
    assert new == want


def test_parity_catches_a_corrupted_weight_and_writes_nothing(tiny_phi3, tmp_path, monkeypatch):
    real = export_mod.export_genai

    def corrupt(model_dir, out, *args):
        real(model_dir, out, *args)
        data = out / "model.onnx.data"  # the LM head is the last tensor: overwrite its last row
        with open(data, "r+b") as f:
            f.seek(-256, 2)
            f.write(np.full(64, 0.5, dtype=np.float32).tobytes())

    monkeypatch.setattr(export_mod, "export_genai", corrupt)
    out = tmp_path / "bad"
    with pytest.raises(ToolchainError, match="export parity failed"):
        export(tiny_phi3, out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refuses_bad_inputs(tiny_phi3, tmp_path):
    with pytest.raises(ToolchainError, match="unknown exporter"):
        export(tiny_phi3, tmp_path / "o", exporter="tflite")
    with pytest.raises(ToolchainError, match="quantize stage"):
        export(tiny_phi3, tmp_path / "o", precision="int4")
    with pytest.raises(ToolchainError, match="no config.json"):
        export(tmp_path, tmp_path / "o")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- the builder's LM head on a vocabulary-wide projection
@pytest.fixture(scope="module")
def phi3_i256(tmp_path_factory):
    """The tiny Phi-3 with intermediate 256: its packed gate_up_proj is 512 wide, as wide as the vocabulary."""
    from conftest import make_tiny_phi3

    return make_tiny_phi3(tmp_path_factory.mktemp("phi3-i256"), intermediate_size=256)


def test_builder_lm_head_clash_is_found_from_the_config(tiny_phi3, phi3_i256, tmp_path):
    from conftest import make_tiny_phi3

    assert export_mod.builder_lm_head_clash(tiny_phi3) == []  # gate_up 256 wide, halves 128: no clash
    assert export_mod.builder_lm_head_clash(phi3_i256)[0] == "model.layers.0.mlp.gate_up_proj (out_features 512)"
    halves = export_mod.builder_lm_head_clash(make_tiny_phi3(tmp_path / "h128-i512", 128, 512))
    assert halves[0] == "the gate/up halves the builder unpacks from model.layers.0.mlp.gate_up_proj (512 wide)"


def test_genai_export_of_a_clashing_model_falls_back_to_optimum(phi3_i256, tmp_path):
    """Reported as an AVX2-only parity failure; the builder's graph is wrong on every CPU
    (docs/phi3-builder-avx2.md)."""
    rep = export(phi3_i256, tmp_path / "out", exporter="genai")
    assert rep["exporter"] == "optimum" and rep["requested_exporter"] == "genai"
    assert "LM head from model.layers.0.mlp.gate_up_proj" in rep["fallback_reason"]
    assert rep["parity"]["passed"] and rep["parity"]["max_abs_logit_diff"] <= 1e-5
    assert json.loads((tmp_path / "out" / "export_report.json").read_text()) == rep
    # The builder itself still gets it wrong: when this fails, onnxruntime-genai has fixed has_lm_head and the
    # fallback can go.
    raw, work = tmp_path / "raw", tmp_path / "work"
    raw.mkdir(), work.mkdir()
    export_mod.export_genai(phi3_i256, raw, "fp32", work, False)
    par = export_mod.check_parity(raw, phi3_i256)
    assert not par["passed"] and par["max_abs_logit_diff"] > 0.1


def test_builder_targets_refuse_a_clashing_model(phi3_i256, tmp_path):
    from toolchain.stages.quantize.builder import build

    with pytest.raises(ToolchainError, match="cuda-fp16 is built by the onnxruntime-genai model builder, and the "
                                             "onnxruntime-genai .* LM head from model.layers.0.mlp.gate_up_proj"):
        build(phi3_i256, "cuda-fp16", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_config_without_architectures_is_a_clear_error(tiny_phi3, tmp_path):
    """The exporters pick the model class from config.json's architectures; a folder without it (a config saved on
    its own, not with the model) fails before any export work, naming the key."""
    import json
    import shutil

    from toolchain.runtime.errors import ToolchainError
    from toolchain.stages.export.decoder import export

    d = shutil.copytree(tiny_phi3, tmp_path / "no-arch")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("architectures")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ToolchainError, match="no 'architectures'"):
        export(d, tmp_path / "out", exporter="genai")
    assert not (tmp_path / "out").exists()
