"""The large-model chain (hf.models.LARGE_MODEL_BYTES; Phi-3-mini at 7.6 GB in bf16 takes it) on a tiny bf16 Phi-3
with the threshold lowered: no fp32 copy anywhere, a torch reference, cpu-int4 built by the builder with each
weight quantized as it is reached, and that int4 model matching the one the fp32-export path quantizes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_phi3, tiny_recipe_file
from toolchain.runtime.errors import ToolchainError


def bf16_copy(src: Path, out: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    w = {k: v.to(torch.bfloat16) for k, v in load_file(out / "model.safetensors").items()}
    save_file(w, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    return out


def prefill_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import onnxruntime as ort

    dec = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]

    s = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in s.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = np.array([ids], dtype=np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((1, len(ids)), dtype=np.int64)
        else:  # past key/value: batch 1, kv heads, no past, head size
            feeds[i.name] = np.zeros([1, dec["num_key_value_heads"], 0, dec["head_size"]], dtype=np.float32)
    return s.run(["logits"], feeds)[0][0]


@pytest.fixture(scope="module")
def large_run(tmp_path_factory):
    import toolchain.hf.models as models
    from toolchain import pipeline

    root = tmp_path_factory.mktemp("large")
    model = bf16_copy(make_tiny_phi3(root / "fp32"), root / "tiny-bf16")
    mp = pytest.MonkeyPatch()
    mp.setattr(models, "LARGE_MODEL_BYTES", 0)
    rec = tiny_recipe_file(root, gates={}, train={"max_steps": 4, "batch_size": 4, "bf16": "off", "lr": 2e-3,
                                                  "checkpoint_every": 0})
    rep = pipeline.edge(str(model), str(rec), target="cpu-int4", out=root / "artifacts")
    yield root, model, rec, rep
    mp.undo()


def test_large_chain_never_holds_fp32(large_run):
    root, model, _, rep = large_run
    art = Path(rep["headline"]["artifact"])
    man = json.loads((art / "manifest.json").read_text())
    assert [s["stage"] for s in man["lineage"]] == ["finetune", "merged", "reference-torch", "build-cpu-int4"]
    stages = art.parent / "stages"
    merged = json.loads((stages / "merged" / "merge_report.json").read_text())
    assert merged["streamed"] and merged["passed"] and merged["dtype"] == ["bfloat16"]
    from safetensors import safe_open

    with safe_open(str(stages / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # merged in the base's own dtype
    q = man["target"]["quantize"]
    assert q["quantized_as_built"] >= 9 and q["int8_matmuls"] == q["quantized_as_built"]  # chat-lora: every projection int8
    assert man["reference"]["onnx_fp32"]["source"].startswith("torch bfloat16")
    m = rep["measured"]
    assert m["perplexity"] > 1 and 0 <= m["token_agreement_fp32"] <= 1
    assert rep["headline"]["fp32_size_mb"] > rep["headline"]["size_mb"]  # fp32 as computed from the bf16 weights


def test_int4_as_built_matches_the_export_path(large_run, tmp_path):
    """The same weights quantized by the fp32-export path (builder fp32 export, then stages/quantize/nbits.py) give
    nearly the same logits: the on-the-fly path changes where quantization happens, not what it computes."""
    from toolchain.config.schema import QuantizeSpec
    from toolchain.stages.export.decoder import export
    from toolchain.stages.quantize.builder import build_large_int4
    from toolchain.stages.quantize.nbits import quantize

    root, model, _, _ = large_run
    spec = QuantizeSpec(block_size=32, symmetric=True, accuracy_level=4)
    build_large_int4(model, tmp_path / "as-built", spec)
    export(model, tmp_path / "fp32", exporter="genai")
    quantize(tmp_path / "fp32", "cpu-int4", tmp_path / "int4", spec)
    ids = list(range(5, 37))
    a, b = prefill_logits(tmp_path / "as-built", ids), prefill_logits(tmp_path / "int4", ids)
    f = prefill_logits(tmp_path / "fp32", ids)
    assert np.abs(a - b).max() < 0.25 * np.abs(a - f).max() + 1e-4, (np.abs(a - b).max(), np.abs(a - f).max())
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.95


def test_large_model_refuses_targets_that_need_the_fp32_export(large_run):
    from toolchain import pipeline
    import toolchain.hf.models as models

    root, model, rec, _ = large_run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "LARGE_MODEL_BYTES", 0)
        with pytest.raises(ToolchainError, match="cpu-int8.*fp32 ONNX export"):
            pipeline.edge(str(model), str(rec), target="cpu-int8", out=root / "artifacts")


def test_replay_answers_come_from_a_large_base_in_its_own_dtype(tmp_path, monkeypatch):
    """The replay answers are generated once, before training; for a large model they come from its bf16 weights,
    never an fp32 copy (Phi-3-mini's fp32 copy held 16.7 GB while it answered)."""
    import toolchain.hf.models as models
    from toolchain.config.catalog import load_recipe
    from toolchain.config.sources import resolve
    from toolchain.stages.finetune import replay

    model = bf16_copy(make_tiny_phi3(tmp_path / "fp32"), tmp_path / "tiny-bf16")
    monkeypatch.setattr(models, "LARGE_MODEL_BYTES", 0)
    monkeypatch.setenv("TOOLCHAIN_HOME", str(tmp_path / "home"))
    seen, load = [], replay.load_causal_lm
    monkeypatch.setattr(replay, "load_causal_lm", lambda path, trc=False, dtype=torch.float32:
                        seen.append(dtype) or load(path, trc, dtype=dtype))
    rec, rec_file = load_recipe(str(tiny_recipe_file(tmp_path)))
    src = resolve(str(model))
    _, info = replay.rows(src, rec, rec_file, models.load_tokenizer(src.path))
    assert seen == [torch.bfloat16] and info["generated"] and info["prompts"] > 0
