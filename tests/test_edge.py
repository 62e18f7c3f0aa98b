"""The whole chain: tiny Phi-3 to a cpu-int4 artifact, the stage cache, resume, tampering, gates, and the
torch-free device path; then the real SmolLM2 default chain with a short training run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_runtime_torch_free import BLOCK_TORCH
from toolchain import pipeline
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.gates import check_gates
from toolchain.runtime.validate import validate
from toolchain.stages.quantize import nbits as quantize_mod


@pytest.fixture(scope="module")
def tiny_run(tiny_artifact):
    """The session's tiny Phi-3 edge run, shared by the tests below (its stages are reused, never rebuilt)."""
    return tiny_artifact


def test_tiny_phi3_int4_artifact(tiny_run):
    root, _, rep = tiny_run
    art = root / "artifacts" / "tiny-phi30-chat-lora" / "cpu-int4"
    assert rep["headline"]["artifact"] == str(art)
    man = json.loads((art / "manifest.json").read_text())
    assert man["target"]["precision"] == "int4" and man["target"]["quantize"]["matmulnbits"] > 0
    assert [s["stage"] for s in man["lineage"]] == ["finetune", "merged", "export-genai", "reference", "quantize-cpu-int4"]
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "eval.jsonl"} <= set(man["files"])
    assert man["versions"]["onnxruntime-genai"] == "0.15.2" and "perplexity" in man["reference"]["torch_tuned"]
    assert man["training"]["method"] == "lora" and man["training"]["ranks"] == 1 and man["training"]["zero"] is None
    assert (art / "report.md").read_text().startswith("# cpu-int4") and (art / "report.png").stat().st_size > 1000
    m = rep["measured"]
    assert m["decode_tok_s_p50"] > 0 and m["eval_examples"] == 8 and 0 <= m["token_agreement_fp32"] <= 1
    assert rep["headline"]["size_mb"] < rep["headline"]["fp32_size_mb"]
    cost = rep["headline"]["stages"]  # what each stage cost this run: wall time and its own peak RSS
    assert list(cost) == ["finetune", "merged", "export-genai", "reference", "quantize-cpu-int4", "cpu-int4", "validate"]
    assert all(c["seconds"] >= 0 and c["peak_rss_mb"] > 50 and not c["reused"] for c in cost.values()), cost
    assert cost["finetune"]["seconds"] > 0 and cost["export-genai"]["seconds"] > 0
    # the manifest keeps what each stage cost when built, and the report shows it
    assert all(s["cost"]["seconds"] >= 0 and s["cost"]["peak_rss_mb"] > 50 for s in man["lineage"]), man["lineage"]
    assert [b["stage"] for b in rep["build_stages"]] == [s["stage"] for s in man["lineage"]]
    assert "## How it was built" in (art / "report.md").read_text()


def test_unchanged_inputs_reuse_every_stage(tiny_run, tiny_phi3, monkeypatch):
    root, rec, _ = tiny_run
    for mod, fn in [("toolchain.stages.finetune.decoder", "finetune"), ("toolchain.stages.export.decoder", "export"),
                    ("toolchain.stages.quantize.nbits", "quantize")]:
        monkeypatch.setattr(f"{mod}.{fn}", lambda *a, **k: pytest.fail(f"{fn} ran again"))
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int4", out=root / "artifacts")
    stages = ["finetune", "merged", "export-genai", "reference", "quantize-cpu-int4", "cpu-int4"]
    assert rep["headline"]["stages_reused"] == {s: True for s in stages}  # every cached stage reused, none rebuilt
    assert rep["validated"] and rep["status"] == "passed"  # and the seventh, validate, ran again on the same artifact
    assert rep["measured"]["eval_examples"] == tiny_run[2]["measured"]["eval_examples"]
    assert rep["measured"]["perplexity"] == pytest.approx(tiny_run[2]["measured"]["perplexity"], rel=1e-6)


def test_interrupted_run_resumes_at_that_stage(tiny_run, tiny_phi3, monkeypatch):
    root, rec, _ = tiny_run
    real, calls = quantize_mod.quantize, []

    def dies(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt  # as if killed mid-stage

    monkeypatch.setattr("toolchain.stages.quantize.nbits.quantize", dies)
    with pytest.raises(KeyboardInterrupt):
        pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int8", out=root / "artifacts")
    run = root / "artifacts" / "tiny-phi30-chat-lora"
    assert not (run / "stages" / "quantize-cpu-int8").exists() and not (run / "cpu-int8").exists()
    monkeypatch.setattr("toolchain.stages.quantize.nbits.quantize", real)
    monkeypatch.setattr("toolchain.stages.finetune.decoder.finetune", lambda *a, **k: pytest.fail("finetune redone"))
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int8", out=root / "artifacts")
    assert rep["target"] == "cpu-int8" and (run / "cpu-int8" / "manifest.json").is_file() and calls == [1]


def test_tampering_with_one_byte_fails_validation(tiny_run, tmp_path):
    import shutil

    root, _, rep = tiny_run
    art = tmp_path / "copy"
    shutil.copytree(rep["headline"]["artifact"], art)
    data = art / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    data.write_bytes(bytes(blob))
    with pytest.raises(ToolchainError, match=r"model.onnx.data: sha256 differs from the manifest"):
        validate(art)
    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(art)], capture_output=True, text=True)
    assert r.returncode == 2 and "sha256 differs" in r.stderr and "Traceback" not in r.stderr


def test_validate_on_device_imports_no_torch_and_enforces_gates(tiny_run, tmp_path):
    """The device path: `toolchain validate` (with prompt lookup) with torch, transformers and peft made
    unimportable."""
    import shutil

    _, _, rep = tiny_run
    art = tmp_path / "device"
    shutil.copytree(rep["headline"]["artifact"], art)
    code = BLOCK_TORCH + "import sys; from toolchain.cli import main; sys.argv = ['toolchain', 'validate', *sys.argv[1:], '--json']; main()"
    r = subprocess.run([sys.executable, "-c", code, str(art), "--lookup", "3"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert out["validated"] and out["measured"]["perplexity"] > 0
    assert "prompt lookup" in out["decoding"] and out["measured"]["lookup_decode_tok_s_p50"] > 0
    assert out["measured"]["answers_decode_tok_s"] > 0
    # a gate nobody can meet: exit 1, and the gate is named
    man = json.loads((art / "manifest.json").read_text())
    man["recipe"]["gates"] = {"min_decode_tok_s": 1e9}
    (art / "manifest.json").write_text(json.dumps(man))
    r = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "gate(s) missed: min_decode_tok_s" in r.stderr


def test_gate_logic():
    ref = {"torch_tuned": {"perplexity": 2.0, "exact_match": 0.8}}
    measured = {"perplexity": 2.3, "exact_match": 0.78, "decode_tok_s_p50": 50.0}
    gates = {"max_perplexity_increase_pct": 10, "min_metric_fraction": 0.95, "min_decode_tok_s": 60}
    res = {g["gate"]: g for g in check_gates(gates, measured, ref, "exact_match")}
    assert not res["max_perplexity_increase_pct"]["passed"] and res["max_perplexity_increase_pct"]["value"] == pytest.approx(15)
    assert res["min_metric_fraction"]["passed"] and res["min_metric_fraction"]["value"] == pytest.approx(0.975)
    assert not res["min_decode_tok_s"]["passed"]
    assert check_gates({}, measured, ref, "exact_match") == []


@pytest.mark.slow
def test_smollm2_default_chain_short(tmp_path):
    """The default model and recipe end to end, with 4 training steps and 8 scored examples."""
    from conftest import tiny_recipe_file

    rec = tiny_recipe_file(tmp_path, gates={"max_perplexity_increase_pct": 50})
    rep = pipeline.edge("smollm2-135m", str(rec), target="cpu-int4", out=tmp_path / "artifacts")
    h = rep["headline"]
    assert rep["passed"] and h["size_mb"] < h["fp32_size_mb"] / 2
    assert abs(h["delta_perplexity_vs_fp32_pct"]) < 50 and h["decode_tok_s"] > 0
    assert 0 <= h["artifact_metric"] <= 1 and rep["reference"]["onnx_fp32"]["eval_examples"] == 8


def test_examples_run_without_torch(tiny_run):
    """Every examples/*.py (onnxruntime-genai's chat loop, ours with prompt lookup) runs as a user would run it on a
    cpu-int4 folder, without torch; the length argument kept small for the tiny model."""
    _, _, rep = tiny_run
    artifact = rep["headline"]["artifact"]
    scripts = sorted((REPO / "examples").glob("*.py"))
    assert len(scripts) >= 2 and any("lookup=" in p.read_text() for p in scripts)
    for path in scripts:
        code = BLOCK_TORCH + ("import runpy, sys; sys.argv = [%r, %r, '64']; runpy.run_path(%r, run_name='__main__')"
                              % (str(path), artifact, str(path)))
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, f"{path.name}: {r.stderr}"


def test_validate_with_own_data_tokenizes_on_device(tiny_run, tmp_path):
    """--data: the user's JSONL is tokenized by the artifact's own tokenizer; no gates against references."""
    _, _, rep = tiny_run
    lines = (REPO / "recipes/data/chat-lora/eval.jsonl").read_text().splitlines()[:3]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = validate(Path(rep["headline"]["artifact"]), data)
    assert out["data"] == str(data) and out["gates"] == [] and out["measured"]["eval_examples"] == 3
    assert out["status"] == "scored" and "passed" not in out  # no gates: neither passed nor missed
    assert out["measured"]["perplexity"] > 1 and "token_agreement_fp32" not in out["measured"]
