"""cpu-int4 defaults chosen by bench/decode.py --tune: the int4 embedding table (GatherBlockQuantized, also when the
builder ties it to lm_head through a Transpose), mixed int4/int8 projections, and the session options a cpu-int4
artifact ships with."""
from __future__ import annotations

import json

import numpy as np
import pytest

from toolchain.config import targets
from toolchain.stages.package import stamp_genai_config
from toolchain.stages.export.decoder import export
from toolchain.stages.quantize.nbits import quantize
from toolchain.config.schema import QuantizeSpec


def test_cpu_int4_ships_its_spinning_choice_where_a_device_owner_can_change_it(tmp_path):
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"session_options": {}}}}))
    stamp_genai_config(tmp_path, targets.get("cpu-int4"))
    so = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert so["session.intra_op.allow_spinning"] == "1" and "cpu-int4" in so["log_id"]
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"session_options": {}}}}))
    stamp_genai_config(tmp_path, targets.get("cpu-int8"))  # only the tuned target changes
    so = json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert "session.intra_op.allow_spinning" not in so


def _prefill_logits(folder):
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12)
    gen = og.Generator(model, params)
    gen.append_tokens(np.arange(5, 13, dtype=np.int32))
    return np.asarray(gen.get_output("logits"), dtype=np.float32)[0]


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

    a, b = _prefill_logits(tmp_path / "plain"), _prefill_logits(tmp_path / "emb")
    assert a.shape == b.shape and np.isfinite(b).all()
    # only the looked-up rows change, by their 4-bit rounding: close, not equal
    assert 0 < np.abs(a - b).max() < 0.5 * np.abs(a).max() + 1e-3


def test_the_default_recipe_quantizes_its_embedding_and_others_keep_theirs():
    from toolchain.config.catalog import load_recipe

    assert load_recipe("chat-lora")[0].quantize.embedding == "int4"
    assert load_recipe("domain-adapt")[0].quantize.embedding == QuantizeSpec().embedding == "fp32"


def test_mixed_int8_projections_and_edge_layers(tiny_export, tmp_path):
    """`quantize.int8` / `int8_edge_layers`: the named projections and the edge layers in 8-bit MatMulNBits, the rest
    int4, and the mix closer to fp32 than all-int4 on the same input."""
    import re

    import onnx

    from toolchain.runtime.errors import ToolchainError

    tiny_export, _ = tiny_export
    base = dict(symmetric=False, embedding="fp32", lm_head_bits=8)
    mixed = quantize(tiny_export, "cpu-int4", tmp_path / "mixed", QuantizeSpec(**base, int8=["qkv_proj", "down_proj"]))
    edges = quantize(tiny_export, "cpu-int4", tmp_path / "edges", QuantizeSpec(**base, int8_edge_layers=1))

    def widths(folder):
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}

    bits = widths(tmp_path / "mixed")
    assert {b for n, b in bits.items() if re.search("qkv_proj|down_proj|lm_head", n)} == {8}
    assert {b for n, b in bits.items() if re.search("o_proj|gate|up_proj", n)} == {4}
    assert mixed["int8_matmuls"] == sum(b == 8 for b in bits.values()) and mixed["matmul_left_fp32"] == 0
    # the tiny model has 2 layers: the first and the last one, whole, in 8-bit
    layers = 1 + max(int(m.group(1)) for n in bits if (m := re.search(r"/layers\.(\d+)/", n)))
    assert layers == 2 and set(widths(tmp_path / "edges").values()) == {8} and edges["matmul_left_fp32"] == 0
    plain = quantize(tiny_export, "cpu-int4", tmp_path / "plain", QuantizeSpec(**base))
    size = lambda f: sum(p.stat().st_size for p in (tmp_path / f).glob("model.onnx*"))  # noqa: E731
    assert plain["int8_matmuls"] == 1 and size("mixed") > size("plain")

    ref, a, b = (_prefill_logits(f) for f in (tiny_export, tmp_path / "plain", tmp_path / "mixed"))
    assert np.abs(b - ref).mean() < np.abs(a - ref).mean()
    from toolchain.stages.quantize.nbits import bit_widths

    with pytest.raises(ToolchainError, match="quantize.int8: no 'down_proj'"):  # a projection the graph lacks
        bit_widths(["/model/layers.0/attn/qkv_proj/MatMul", "/lm_head/MatMul"], QuantizeSpec(int8=["down_proj"]))


def test_pruned_lm_head_gives_the_last_positions_logits_and_scores_token_by_token(tiny_export, tmp_path):
    """`quantize.prune_lm_head`: onnxruntime-genai takes the graph as pruned (one position from a prompt), the last
    position's logits and the greedy tokens are the unpruned model's, perplexity still comes out (one token per pass),
    and prompt lookup refuses it with the key to change."""
    import onnx

    from toolchain.runtime.errors import ToolchainError
    from toolchain.runtime import genai

    tiny_export, _ = tiny_export
    base = dict(symmetric=False, embedding="int4")
    full = quantize(tiny_export, "cpu-int4", tmp_path / "full", QuantizeSpec(**base))
    pruned = quantize(tiny_export, "cpu-int4", tmp_path / "pruned", QuantizeSpec(**base, prune_lm_head=True))
    assert pruned["logits"] == "last position only" and full["logits"] == "every position"
    assert pruned["matmulnbits"] == full["matmulnbits"]
    out = next(o for o in onnx.load(str(tmp_path / "pruned" / "model.onnx"), load_external_data=False).graph.output
               if o.name == "logits")
    assert out.type.tensor_type.shape.dim[1].dim_value == 1

    a, b = _prefill_logits(tmp_path / "full"), _prefill_logits(tmp_path / "pruned")
    assert a.shape[0] == 8 and b.shape[0] == 1
    np.testing.assert_allclose(b[0], a[-1], atol=1e-4)
    (fm, _), (pm, _) = genai.load(tmp_path / "full"), genai.load(tmp_path / "pruned")
    ids = list(range(5, 25))
    assert genai.generate(pm, ids, 12, force_length=True).tokens == genai.generate(fm, ids, 12, force_length=True).tokens
    labels = [-100] * 5 + ids[5:]
    (na, ca), (nb, cb) = genai.nll(fm, ids, labels), genai.nll(pm, ids, labels)
    assert ca == cb == 15 and nb == pytest.approx(na, rel=1e-3)
    with pytest.raises(ToolchainError, match="prune_lm_head"):
        genai.generate(pm, ids, 12, lookup=3, eos=(0,))
