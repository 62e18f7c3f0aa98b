"""The GGUF targets (gguf-q8_0, gguf-q4_k_m): built by llama.cpp's own converter from the merged folder, packaged
with the shipped eval split and a manifest, and validated with llama.cpp only where llama-cpp-python is installed
(elsewhere: not_validated, exit 3, never a pass).

The model is a tiny random Llama with SmolLM2's tokenizer: llama.cpp's converter recognises a BPE tokenizer by how
it splits a test text, so the tiny Phi-3's own 512-token BPE is refused (and a Phi-3 without tokenizer.model too).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import tiny_recipe_file
from toolchain import pipeline
from toolchain.runtime import llamacpp
from toolchain.runtime.errors import ToolchainError

HAS_LLAMA = llamacpp.llama_cpp_version() is not None


def make_tiny_llama(out: Path, tokenizer_from: Path, hidden: int = 64) -> Path:
    """A 2-layer random Llama (SmolLM2's architecture, tied embedding) with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def converter():
    """llama.cpp's converter in this session's TOOLCHAIN_HOME: copied from the user's own cache when it is there
    (the sdist is 77 MB), else fetched by the toolchain as a user's first GGUF build does."""
    from toolchain.config.catalog import home
    from toolchain.stages.quantize import gguf

    name = f"llama_cpp_python-{gguf.LLAMA_CPP_PYTHON}"
    mine = Path.home() / ".cache" / "edge-toolchain" / "llama.cpp" / name
    dest = home() / "llama.cpp" / name
    if mine.is_dir() and not dest.exists():
        shutil.copytree(mine, dest)
    return gguf.converter()


@pytest.fixture(scope="module")
def gguf_run(smollm2, converter, tmp_path_factory):
    """One tiny Llama gguf-q8_0 `edge` run: (out folder, recipe file, model folder, the report)."""
    root = tmp_path_factory.mktemp("gguf")
    model = make_tiny_llama(root / "tiny-llama", smollm2)
    rec = tiny_recipe_file(root, gates={"max_perplexity_increase_pct": 50})
    rep = pipeline.edge(str(model), str(rec), target="gguf-q8_0", out=root / "artifacts")
    return root / "artifacts", rec, model, rep


def _blocked(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError


def _cli(monkeypatch, *args) -> int:
    """`toolchain ARGS` in this process (so llama_cpp stays blocked); its exit code."""
    from toolchain.cli import main

    monkeypatch.setattr(sys, "argv", ["toolchain", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code


def test_gguf_targets_are_listed_and_opt_in():
    from toolchain import auto
    from toolchain.config import targets

    for name, precision in (("gguf-q8_0", "q8_0"), ("gguf-q4_k_m", "q4_k_m")):
        t = targets.get(name)
        assert (t["ep"], t["provider"], t["built_by"], t["precision"]) == ("llama.cpp", "llama.cpp", "llama.cpp", precision)
    assert not any(base.startswith("gguf") for _, base, _ in auto.candidates())
    rows = {r["target"]: r for r in targets.listing()}
    assert rows["gguf-q8_0"]["validate_here"] is HAS_LLAMA
    assert HAS_LLAMA or "llama-cpp-python not installed" in rows["gguf-q8_0"]["why"]


def test_gguf_q8_0_artifact_and_not_validated_without_llama_cpp(gguf_run, monkeypatch, capsys):
    from toolchain.runtime.manifest import verify
    from toolchain.runtime.validate import validate

    out, _, model, rep = gguf_run
    art = out / f"{model.name}-chat-lora" / "gguf-q8_0"
    man = verify(art)  # every file against its sha256
    assert sorted(man["files"]) == ["eval.jsonl", "model-Q8_0.gguf", "retention.jsonl"]
    t = man["target"]
    assert (t["name"], t["built_by"], t["ep"], t["precision"]) == ("gguf-q8_0", "llama.cpp", "llama.cpp", "q8_0")
    q = t["quantize"]
    assert q["converter_outtype"] == "q8_0" and q["architecture"] == "llama" and q["pre_tokenizer"] == "smollm"
    assert q["chat_template"] and t["exporter"].startswith("llama.cpp convert_hf_to_gguf.py")
    assert (art / "model-Q8_0.gguf").read_bytes()[:4] == b"GGUF"
    shipped = (out / f"{model.name}-chat-lora" / "stages" / "reference" / "eval.jsonl").read_bytes()
    assert (art / "eval.jsonl").read_bytes() == shipped  # the same held-out split the ONNX artifacts ship
    assert not (art / "genai_config.json").exists() and not (art / "inference_model.json").exists()
    card = (art / "README.md").read_text()
    assert "library_name: gguf" in card and "llama-cli -m model-Q8_0.gguf" in card
    if not HAS_LLAMA:  # what `toolchain edge` reported, validated in its own process
        assert rep["status"] == "not_validated" and rep["reason"] == llamacpp.NOT_INSTALLED and not rep["passed"]

    _blocked(monkeypatch)
    r = validate(art)
    assert (r["status"], r["validated"], r["passed"], r["gates"]) == ("not_validated", False, False, [])
    assert r["reason"] == "built, not validated on this host: llama-cpp-python not installed"
    assert r["measured"]["size_mb"] == pytest.approx((art / "model-Q8_0.gguf").stat().st_size / 1e6)
    saved = (art / "report.json").read_text()
    capsys.readouterr()
    assert _cli(monkeypatch, "validate", str(art)) == 3 and llamacpp.NOT_INSTALLED in capsys.readouterr().err
    (art / "report.json").write_text(saved)  # the CLI rewrote it; leave the artifact's report as `edge` wrote it


def test_q4_k_m_needs_llama_cpp_python_before_any_work(gguf_run, monkeypatch, capsys):
    out, rec, model, _ = gguf_run
    _blocked(monkeypatch)
    with pytest.raises(ToolchainError, match=r"make bench.*pip install llama-cpp-python"):
        pipeline.edge(str(model), str(rec), target="gguf-q4_k_m", out=out)
    assert not (out / f"{model.name}-chat-lora" / "gguf-q4_k_m").exists()
    capsys.readouterr()
    assert _cli(monkeypatch, "edge", "--model", str(model), "--recipe", str(rec), "--target", "gguf-q4_k_m",
                "--out", str(out)) == 2
    assert "make bench" in capsys.readouterr().err


def test_tokenizer_mismatch_is_refused():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_ids": [5, 6]}]
    same = llamacpp.check_tokenizer(lambda ids: bytes(ids), lambda b: list(b), rows)
    assert same == 2
    with pytest.raises(ToolchainError, match=r"row 1: the GGUF's tokenizer \(llama.cpp\) does not give the shipped "
                                             r"token ids \(input_ids, first difference at position 1"):
        llamacpp.check_tokenizer(lambda ids: bytes(ids), lambda b: [b[0], 9, *b[2:]], rows)


def test_a_tokenizer_llama_cpp_does_not_know_fails_the_build_clearly(tiny_phi3, converter, tmp_path):
    from toolchain.stages.quantize import gguf

    with pytest.raises(ToolchainError, match=r"convert_hf_to_gguf.py could not convert .*tokenizer.model"):
        gguf.build(tiny_phi3, "gguf-q8_0", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (make bench builds it)")
def test_gguf_validated_with_llama_cpp(gguf_run):
    """Where llama-cpp-python is installed: the tokenizer check, perplexity near the fp32 ONNX model's, the task
    metric, decode speed, the gates, --data; and gguf-q4_k_m built by llama.cpp's quantizer."""
    out, rec, model, rep = gguf_run
    m, ref = rep["measured"], rep["reference"]
    assert rep["validated"] and rep["provider"] == "llama.cpp" and rep["status"] == "passed", rep
    assert m["tokenizer_rows_checked"] > 0 and m["decode_tok_s_p50"] > 0 and m["eval_examples"] > 0
    assert abs(m["perplexity"] / ref["onnx_fp32"]["perplexity"] - 1) < 0.05  # Q8_0 of a random tiny model
    assert [g["gate"] for g in rep["gates"]] == ["max_perplexity_increase_pct"]
    assert m["token_agreement_fp32"] > 0.5
    # retention, as on the ONNX artifacts: the shipped general set answered by llama.cpp
    assert m["retention_items"] == 48 and 0 <= m["retention"] <= 1 and set(m["retention_by_kind"]) >= {"fact"}
    # --data: the recipe's own held-out JSONL, tokenized by the GGUF's tokenizer and chat template, gives the ids
    # the pipeline shipped (tokenized by transformers), so the same perplexity; no gates on a user's data
    from conftest import REPO
    from toolchain.runtime.validate import validate

    art = out / f"{model.name}-chat-lora" / "gguf-q8_0"
    mine = validate(art, data=REPO / "recipes/data/chat-lora/eval.jsonl")
    assert mine["validated"] and mine["gates"] == [] and mine["data"].endswith("eval.jsonl")
    assert mine["measured"]["perplexity"] == pytest.approx(m["perplexity"], rel=1e-4)
    rep4 = pipeline.edge(str(model), str(rec), target="gguf-q4_k_m", out=out)
    art = out / f"{model.name}-chat-lora" / "gguf-q4_k_m"
    man = json.loads((art / "manifest.json").read_text())
    assert "model-Q4_K_M.gguf" in man["files"] and man["target"]["quantize"]["llama_ftype"] == 15
    assert rep4["validated"] and rep4["measured"]["perplexity"] > 0
