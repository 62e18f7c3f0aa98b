"""Targets beyond the CPU: the listing, a builder target whose EP this host lacks (built, never counted as passed),
npu-qdq validated on the CPU EP, and auto's choice (pure gate logic, then a small end-to-end run)."""
from __future__ import annotations

import json
import subprocess
import sys

import onnxruntime as ort
import pytest

from conftest import REPO, prepare
from toolchain import auto as auto_mod
from toolchain import pipeline
from toolchain.runtime.validate import validate

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "toolchain", *args], capture_output=True, text=True, cwd=REPO)


def test_targets_listing():
    r = _cli("targets", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["target"]: x for x in json.loads(r.stdout)}
    assert set(rows) == {"cpu-fp32", "cpu-int4", "cpu-int8", "cuda-fp16", "cuda-int4", "dml-int4", "webgpu-int4", "npu-qdq",
                         "gguf-q8_0", "gguf-q4_k_m"}
    assert rows["cuda-int4"]["ep"] == "CUDAExecutionProvider" and rows["cuda-int4"]["built_by"] == "builder"
    assert rows["npu-qdq"]["built_by"] == "qdq" and rows["npu-qdq"]["provider_options"] == {"backend_type": "htp"}
    assert rows["cpu-int4"]["validate_here"] is True and rows["cpu-int4"]["why"] is None
    assert rows["cpu-int4"]["validate_on"] == "CPUExecutionProvider" and rows["cpu-int8"]["precision"] == "int8"
    if not HAS_CUDA:
        assert rows["cuda-fp16"]["validate_here"] is False and rows["cuda-fp16"]["validate_on"] is None
        assert rows["cuda-fp16"]["why"] == "CUDAExecutionProvider unavailable"
    assert rows["npu-qdq"]["validate_here"] is True  # on QNN, or its accuracy on the CPU EP
    assert rows["npu-qdq"]["validate_on"] in ("QNNExecutionProvider", "CPUExecutionProvider")
    assert rows["npu-qdq"]["gates"] == {"min_token_agreement_fp32": 0.9} and rows["cpu-int4"]["gates"] == {}
    assert "webgpu-int4" in _cli("targets").stdout


def test_quantize_command_names_where_other_targets_are_built(tmp_path):
    r = _cli("quantize", "--onnx", str(tmp_path), "--target", "npu-qdq", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "toolchain edge --target npu-qdq" in r.stderr


@pytest.fixture(scope="module")
def tiny(tiny_phi3, tmp_path_factory):
    """The shared stages of a tiny Phi-3 run (finetune, merge, export, reference)."""
    from conftest import tiny_recipe_file

    root = tmp_path_factory.mktemp("targets")
    rec = tiny_recipe_file(root, gates={"max_perplexity_increase_pct": 50, "min_decode_tok_s": 1})
    return root / "artifacts", rec


@pytest.mark.skipif(HAS_CUDA, reason="this host has the CUDA EP: the missing-EP path cannot be shown here")
def test_cuda_int4_is_built_but_not_validated_without_the_ep(tiny, tiny_phi3):
    out, rec = tiny
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="cuda-int4", out=out)
    art = out / "tiny-phi30-chat-lora" / "cuda-int4"
    assert rep["status"] == "not_validated" and rep["passed"] is False and rep["gates"] == []
    assert rep["reason"] == "built, not validated on this host: CUDAExecutionProvider unavailable"
    man = json.loads((art / "manifest.json").read_text())["target"]
    assert (man["ep"], man["precision"], man["provider"]) == ("CUDAExecutionProvider", "int4", "cuda")
    assert "enable_cuda_graph" in man["provider_options"] and man["quantize"]["ops"]["MatMulNBits"] > 0
    so = json.loads((art / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert "cuda" in so["provider_options"][0] and "cuda-int4 int4" in so["log_id"]
    saved = json.loads((art / "report.json").read_text())
    assert saved["status"] == "not_validated" and not saved["passed"]
    assert "not validated on this host" in (art / "report.md").read_text()
    r = _cli("validate", str(art))
    assert r.returncode == 3 and "built, not validated on this host: CUDAExecutionProvider unavailable" in r.stderr


def test_npu_qdq_validated_on_cpu_within_the_gates(tiny, tiny_phi3):
    out, rec = tiny
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="npu-qdq", out=out)
    art = out / "tiny-phi30-chat-lora" / "npu-qdq"
    assert rep["validated"] and rep["provider"] == "cpu"
    assert "QNNExecutionProvider unavailable" in rep["note"] and rep["gates_not_applicable"] == ["min_decode_tok_s"]
    # the stated budget: the recipe's accuracy gates plus the target's own (targets.py), carried by the manifest
    assert [g["gate"] for g in rep["gates"]] == ["max_perplexity_increase_pct", "min_token_agreement_fp32"]
    assert rep["target_gates"] == {"min_token_agreement_fp32": 0.9}
    assert abs(rep["headline"]["delta_perplexity_vs_fp32_pct"]) < 5
    # free-running greedy decoding through the KV cache tracks the fp32 model: 0.91 here (8 prompts x 40 tokens; it was
    # 0.06 when the KV cache was quantized). This random model has near-ties that flip late in 3 of the 8 answers and
    # cascade, so the exact figure may move on another CPU's kernels: its budget gate (0.9) is checked for consistency
    # here, and test_npu_qdq_decode_tracks_fp32 checks the decode path step by step
    agree = rep["measured"]["token_agreement_fp32"]
    assert agree >= 0.8 and all(g["passed"] for g in rep["gates"] if g["gate"] != "min_token_agreement_fp32")
    assert rep["status"] == ("passed" if agree >= 0.9 else "gates_missed")
    man = json.loads((art / "manifest.json").read_text())["target"]
    q = man["quantize"]
    assert q["quantize_linear"] > 0 and q["activations"] == "quint16" and q["calibration"]["samples"] == 16
    assert q["ops_with_qdq_inputs"]["MatMul"] == 11  # every projection and the lm_head read QDQ weights
    assert q["kept_float"]["op_types"] == {"GroupQueryAttention": 2} and q["kept_float"]["kv_cache_qdq_nodes"] == 0
    assert any("static-shape" in x for x in q["not_done"]) and man["also_runs_on"][0]["ep"] == "VitisAIExecutionProvider"
    cfg = json.loads((art / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert cfg["provider_options"] == [{"qnn": {"backend_type": "htp"}}]
    assert validate(art)["provider"] == "cpu"  # the device path: genai_config names QNN, the CPU EP runs it here


def _kv_names(art):
    dec = json.loads((art / "genai_config.json").read_text())["model"]["decoder"]
    io = [dec["inputs"][k] % i for k in ("past_key_names", "past_value_names") for i in range(dec["num_hidden_layers"])]
    return io + [dec["outputs"][k] % i for k in ("present_key_names", "present_value_names")
                 for i in range(dec["num_hidden_layers"])], dec


def test_npu_qdq_keeps_the_kv_cache_float(tiny, tiny_phi3):
    """No QuantizeLinear/DequantizeLinear on past_key_values/present: GroupQueryAttention reads the graph's KV inputs
    and writes its present outputs directly, and the rotary caches it reads stay float."""
    import onnx

    out, rec = tiny
    art = pipeline.build_target(prepare(str(tiny_phi3), str(rec), out), "npu-qdq")
    kv, _ = _kv_names(art)
    g = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and not [n.name for n in qdq if set(kv) & (set(n.input) | set(n.output))]
    gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    for i, n in enumerate(gqa):
        assert n.input[3:5] == [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        assert n.output[1:] == [f"present.{i}.key", f"present.{i}.value"]
        assert n.input[0].endswith("_DequantizeLinear_Output")  # the qkv projection around it is still QDQ
    producers = {o: n.op_type for n in g.node for o in n.output}
    assert {producers.get(n.input[7]) for n in gqa} == {None}  # cos_cache: a float initializer, no DequantizeLinear


def test_npu_qdq_decode_tracks_fp32(tiny, tiny_phi3):
    """onnxruntime directly: a prompt, then one-token decode steps through the KV cache, fp32 export vs npu-qdq.
    Each step feeds the fp32 model's greedy token to both, so one near-tie cannot cascade."""
    import numpy as np

    out, rec = tiny
    r = prepare(str(tiny_phi3), str(rec), out)
    art = pipeline.build_target(r, "npu-qdq")
    _, dec = _kv_names(art)
    layers, shape = dec["num_hidden_layers"], (1, dec["num_key_value_heads"], 0, dec["head_size"])
    sess = [ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"]) for d in (r.export, art)]

    def step(s, ids, past, total):
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64),
                **{f"past_key_values.{i}.{kv}": past[2 * i + j] for i in range(layers) for j, kv in enumerate(("key", "value"))}}
        names = [o.name for o in s.get_outputs()]
        o = dict(zip(names, s.run(None, feed)))
        return o["logits"][0, -1], [o[f"present.{i}.{kv}"] for i in range(layers) for kv in ("key", "value")]

    prompt = json.loads((art / "eval.jsonl").read_text().splitlines()[0])["prompt_ids"]
    empty = [np.zeros(shape, np.float32)] * (2 * layers)
    (lf, pf), (lq, pq) = (step(s, prompt, empty, len(prompt)) for s in sess)
    agree, diffs = [], []
    for t in range(16):
        tok = int(lf.argmax())
        agree.append(tok == int(lq.argmax()))
        diffs.append(float(np.abs(lf - lq).max()))
        (lf, pf), (lq, pq) = step(sess[0], [tok], pf, len(prompt) + t + 1), step(sess[1], [tok], pq, len(prompt) + t + 1)
    # with Q/DQ on the KV cache (calibrated on empty prefill caches) this was 7/16 steps, logits off by ~0.4
    assert sum(agree) >= 15 and max(diffs[1:]) < 0.05, (agree, diffs)


def test_target_budget_adds_or_tightens_the_recipe_gates():
    from toolchain.runtime.validate import check_gates, merge_gates

    g = merge_gates({"min_metric_fraction": 0.95, "max_perplexity_increase_pct": 10, "min_decode_tok_s": None},
                    {"min_token_agreement_fp32": 0.9, "min_metric_fraction": 0.5, "max_perplexity_increase_pct": 5})
    assert g == {"min_metric_fraction": 0.95, "max_perplexity_increase_pct": 5, "min_token_agreement_fp32": 0.9}
    ref = {"torch_tuned": {"exact_match": 0.95, "perplexity": 1.0}}
    broken = {"exact_match": 0.0, "perplexity": 1.002, "token_agreement_fp32": 0.028}  # the old npu-qdq on SmolLM2
    res = {r["gate"]: r["passed"] for r in check_gates(g, broken, ref, "exact_match")}
    assert res == {"max_perplexity_increase_pct": True, "min_metric_fraction": False, "min_token_agreement_fp32": False}


def _cand(name, size, tok_s, gates, validated=True):
    return {"name": name, "validated": validated, "size_mb": size, "decode_tok_s": tok_s, "reason": None if validated
            else "built, not validated on this host: CUDAExecutionProvider unavailable",
            "gates": [{"gate": g, "value": v, "limit": lim, "passed": ok} for g, v, lim, ok in gates]}


def test_auto_gate_logic():
    ok = [("min_metric_fraction", 0.97, 0.95, True)]
    miss = [("min_metric_fraction", 0.80, 0.95, False), ("max_perplexity_increase_pct", 12.0, 10, False)]
    cands = [_cand("hqq", 150.0, 90.0, miss), _cand("b32", 202.0, 80.0, ok), _cand("b32-sym", 200.5, 85.0, ok),
             _cand("b16", 230.0, 70.0, ok), _cand("cuda", 100.0, None, [], validated=False)]
    c = auto_mod.choose(cands)
    # smallest passing is b32-sym (200.5); b32 (202.0) is within 1%, and b32-sym is also faster
    assert c["pick"] == "b32-sym" and "200.5 MB" in c["reason"] and c["qualified"] == ["b32-sym", "b32", "b16"]
    rej = {r["name"]: r for r in c["rejected"]}
    assert rej["hqq"]["missed"] == ["min_metric_fraction", "max_perplexity_increase_pct"]
    assert "not validated on this host" in rej["cuda"]["why"]  # a missing EP is never a pass, however small
    # within 1%, the faster wins even if a little larger
    c = auto_mod.choose([_cand("a", 100.0, 50.0, ok), _cand("b", 100.9, 60.0, ok), _cand("c", 102.0, 99.0, ok)])
    assert c["pick"] == "b" and "fastest" in c["reason"]
    assert auto_mod.choose([_cand("x", 1.0, 1.0, miss)])["pick"] is None


def test_auto_end_to_end_small(tiny, tiny_phi3, monkeypatch):
    """auto on two real variants (lm_head int8 and dynamic int8); a re-run reuses every artifact and report."""
    out, rec = tiny
    monkeypatch.setattr(auto_mod, "CANDIDATES", [c for c in auto_mod.CANDIDATES if c[0] in ("int4-rtn-b32-asym-head8", "int8")])
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="auto", out=out)
    folder = out / "tiny-phi30-chat-lora" / "auto"
    assert {c["name"] for c in rep["candidates"]} == {"int4-rtn-b32-asym-head8", "int8"}
    assert rep["pick"] in ("int4-rtn-b32-asym-head8", "int8") and rep["reason"].startswith(rep["pick"])
    assert (folder / "frontier.png").stat().st_size > 1000 and "**Pick:**" in (folder / "auto_report.md").read_text()
    head8 = json.loads((folder / "int4-rtn-b32-asym-head8" / "manifest.json").read_text())["target"]
    assert head8["variant_of"] == "cpu-int4" and head8["quantize"]["lm_head_bits"] == 8
    real = pipeline.validate_artifact
    monkeypatch.setattr(pipeline, "validate_artifact", lambda *a, **k: pytest.fail("re-validated an unchanged artifact"))
    again = pipeline.edge(str(tiny_phi3), str(rec), target="auto", out=out)
    assert again["pick"] == rep["pick"]
    # a gate no variant can meet: the artifacts are repackaged with the new recipe, re-validated, and none is picked
    import yaml

    original = rec.read_text()
    y = yaml.safe_load(original)
    y["gates"]["min_decode_tok_s"] = 1e9
    rec.write_text(yaml.safe_dump(y))
    monkeypatch.setattr(pipeline, "validate_artifact", real)
    try:
        none = pipeline.edge(str(tiny_phi3), str(rec), target="auto", out=out)
    finally:
        rec.write_text(original)
    assert none["pick"] is None and not none["passed"]
    assert all(r["missed"] == ["min_decode_tok_s"] for r in none["rejected"]) and len(none["rejected"]) == 2


@pytest.mark.skipif(HAS_CUDA, reason="checks the missing-EP path")
@pytest.mark.parametrize("target,provider", [("cuda-fp16", "cuda"), ("dml-int4", "dml"), ("webgpu-int4", "webgpu")])
def test_other_builder_targets_name_their_ep(tiny, tiny_phi3, target, provider):
    out, rec = tiny
    r = prepare(str(tiny_phi3), str(rec), out)
    art = pipeline.build_target(r, target)
    man = json.loads((art / "manifest.json").read_text())["target"]
    so = json.loads((art / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert man["provider"] == provider and list(so["provider_options"][0]) == [provider]
    assert so["provider_options"][0][provider] == man["provider_options"] and man["precision"] in so["log_id"]
    rep = validate(art)
    assert rep["status"] == "not_validated" and not rep["passed"] and man["ep"] in rep["reason"]
