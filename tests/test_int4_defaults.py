"""cpu-int4 defaults chosen by bench/decode.py --tune: the int4 embedding table (GatherBlockQuantized, also when the
builder ties it to lm_head through a Transpose) and the session options a cpu-int4 artifact ships with."""
from __future__ import annotations

import json

import numpy as np
import pytest

from toolchain import targets
from toolchain.export import export
from toolchain.quantize import quantize
from toolchain.schema import QuantizeSpec


def test_cpu_int4_ships_without_intra_op_spinning(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"session_options": {}}}}))
    targets.stamp_genai_config(tmp_path, targets.get("cpu-int4"))
    so = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert so["session.intra_op.allow_spinning"] == "0" and "cpu-int4" in so["log_id"]
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"session_options": {}}}}))
    targets.stamp_genai_config(tmp_path, targets.get("cpu-int8"))  # only the tuned target changes
    so = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert "session.intra_op.allow_spinning" not in so


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_export(request, tiny_phi3, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_phi3
    if request.param:  # the same tiny model with lm_head tied to the embedding, as SmolLM2
        src = tmp_path_factory.mktemp("tied")
        net = AutoModelForCausalLM.from_pretrained(tiny_phi3)
        net.config.tie_word_embeddings = True
        net.lm_head.weight = net.model.embed_tokens.weight
        net.save_pretrained(src, safe_serialization=True)
        AutoTokenizer.from_pretrained(tiny_phi3).save_pretrained(src)
    out = tmp_path_factory.mktemp("export") / "fp32"
    export(src, out, exporter="genai")
    return out, request.param


def test_int4_embedding_is_block_quantized_and_runs(tiny_export, tmp_path):
    import onnx
    import onnxruntime_genai as og

    tiny_export, tied = tiny_export
    fp32 = onnx.load(str(tiny_export / "model.onnx"), load_external_data=False).graph
    # the builder reads a tied table through Transpose(lm_head weight): the case the quantize stage folds
    assert any(n.op_type == "Transpose" and "embed_tokens" in n.name for n in fp32.node) == tied

    plain = quantize(tiny_export, "cpu-int4", tmp_path / "plain", QuantizeSpec(symmetric=False, embedding="fp32"))
    emb = quantize(tiny_export, "cpu-int4", tmp_path / "emb", QuantizeSpec(symmetric=False, embedding="int4"))
    assert plain["gather_block_quantized"] == 0 and emb["gather_block_quantized"] == 1
    assert emb["matmulnbits"] == plain["matmulnbits"] and emb["embedding"] == "int4"
    graph = onnx.load(str(tmp_path / "emb" / "model.onnx"), load_external_data=False).graph
    used = {i for n in graph.node for i in n.input}
    assert all(i.name in used for i in graph.initializer)  # no fp32 table left behind
    assert not any(n.op_type == "Transpose" and "embed_tokens" in n.name for n in graph.node)
    assert emb["size_mb"] <= plain["size_mb"]

    def logits(folder):
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=12)
        gen = og.Generator(model, params)
        gen.append_tokens(np.arange(5, 13, dtype=np.int32))
        return np.asarray(gen.get_output("logits"), dtype=np.float32)[0]

    a, b = logits(tmp_path / "plain"), logits(tmp_path / "emb")
    assert a.shape == b.shape and np.isfinite(b).all()
    # only the looked-up rows change, by their 4-bit rounding: close, not equal
    assert 0 < np.abs(a - b).max() < 0.5 * np.abs(a).max() + 1e-3


def test_the_default_recipe_quantizes_its_embedding_and_others_keep_theirs():
    from toolchain.catalog import load_recipe

    assert load_recipe("chat-lora")[0].quantize.embedding == "int4"
    assert load_recipe("domain-adapt")[0].quantize.embedding == QuantizeSpec().embedding == "fp32"
