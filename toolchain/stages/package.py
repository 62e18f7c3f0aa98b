"""Stage 6: assemble the artifact a user copies to a device.

    <target>/  the onnxruntime-genai folder (model, genai_config.json, tokenizer, chat template)
               inference_model.json  its name and prompt template for Foundry Local and the AI Toolkit
               eval.jsonl      the held-out split, tokenized, with the reference greedy tokens (stages/reference.py)
               retention.jsonl the general retention set, tokenized under the generic system prompt
               manifest.json   card, resolved recipe, package versions, input hashes, sha256 of every file,
                               stage lineage, how it was trained (method, precision, ranks, ZeRO stage),
                               reference metrics (torch base/tuned, fp32 ONNX)
An encoder artifact (package_encoder) is model.onnx, tokenizer.json, eval.jsonl and manifest.json. A GGUF artifact
(package_gguf) is model-<QUANT>.gguf (weights, vocabulary, merges and chat template in one file), eval.jsonl and
manifest.json: no genai_config.json or inference_model.json, which are onnxruntime-genai's and Foundry Local's.
Reports (report.json, report.md, report.png) and the model card README.md (it carries the scores) are added
after validation and are not hashed.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from toolchain.runtime.fsutil import atomic_dir
from toolchain.runtime import manifest as man_mod
from toolchain.runtime.contracts import Manifest
from toolchain.runtime.encoder import MODEL as ENCODER_MODEL
from toolchain.runtime.encoder import TOKENIZER as ENCODER_TOKENIZER
from toolchain.runtime.manifest import EVAL_FILE
from toolchain.runtime.retention import RETENTION_FILE

VERSION = 3  # part of the package stage's key: bump when the files an artifact holds change (2: inference_model.json,
# 3: retention.jsonl)
INFERENCE_MODEL = "inference_model.json"
PACKAGES = ["edge-toolchain", "torch", "transformers", "peft", "optimum", "optimum-onnx", "onnx", "onnxruntime",
            "onnxruntime-genai", "tokenizers", "numpy"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def package(quantized: Path, eval_file: Path, out: Path, manifest: Manifest) -> Path:
    """Copy the quantized folder and the tokenized eval split into `out`, then write manifest.json last (with the
    package versions, the time and the sha256 of every file filled in)."""
    with atomic_dir(Path(out)) as tmp:
        for p in Path(quantized).iterdir():
            if p.is_file() and p.name != "quantize_report.json":
                shutil.copy2(p, tmp / p.name)
        shutil.copy2(eval_file, tmp / EVAL_FILE)
        general = Path(eval_file).parent / RETENTION_FILE  # beside eval.jsonl in the reference stage
        if general.is_file():
            shutil.copy2(general, tmp / RETENTION_FILE)
        stamp_genai_config(tmp, manifest.target)
        write_inference_model(tmp, artifact_name(manifest.out()))
        _write_manifest(tmp, manifest)
    return Path(out)


def artifact_name(manifest: dict) -> str:
    """The artifact's model name (inference_model.json's Name, the README's title): model-recipe-target."""
    return f"{manifest['model_card']['name']}-{manifest['recipe']['name']}-{manifest['target']['name']}"


def write_inference_model(folder: Path, name: str) -> dict:
    """inference_model.json: how Foundry Local finds a local onnxruntime-genai model and prompts it.

    Format checked against Foundry Local's own documentation and source, not guessed:
      - microsoft/Foundry-Local docs/how-to/compile-models-for-foundry-local.md: the file holds "Name" and a
        "PromptTemplate" whose "prompt" is the chat template applied to one user turn with the content "{Content}"
        and the generation prompt (they build it with apply_chat_template, as here), and "assistant": "{Content}";
      - the Foundry Local C++ SDK's catalog/local_model_scanner.cc: a folder is a local model when it holds
        genai_config.json and an inference_model.json with a string "Name" (":0" is appended when the name has
        no ":version"); toolCallStart / toolCallEnd / supportsToolCalling are optional and left out here;
      - sdk_v2/js/docs/interfaces/PromptTemplate.md: assistant and prompt required, system and user optional.
    The AI Toolkit's model-lab evaluator reads the same PromptTemplate.prompt. A model without a chat template gets
    "{Content}" as is (what toolchain.hf.models.user_prompt gives)."""
    from toolchain.hf.models import load_tokenizer, user_prompt

    tok = load_tokenizer(Path(folder))  # the artifact's own tokenizer files and chat template
    doc = {"Name": name, "PromptTemplate": {"assistant": "{Content}", "prompt": user_prompt(tok, "{Content}")}}
    (Path(folder) / INFERENCE_MODEL).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return doc


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    done = manifest.model_copy(update={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "versions": versions(), "files": man_mod.file_hashes(folder)})
    (folder / man_mod.MANIFEST).write_text(json.dumps(done.out(), indent=2))


def package_encoder(q_dir: Path, model_dir: Path, eval_rows: list[dict], out: Path, manifest: Manifest) -> Path:
    """An encoder artifact: model.onnx, tokenizer.json, the held-out rows and the manifest (no GenAI folder)."""
    with atomic_dir(Path(out)) as tmp:
        shutil.copy2(Path(q_dir) / ENCODER_MODEL, tmp / ENCODER_MODEL)
        shutil.copy2(Path(model_dir) / ENCODER_TOKENIZER, tmp / ENCODER_TOKENIZER)
        (tmp / EVAL_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in eval_rows))
        _write_manifest(tmp, manifest)
    return Path(out)


def package_gguf(built: Path, eval_file: Path, out: Path, manifest: Manifest) -> Path:
    """A GGUF artifact: the stage's .gguf file, the tokenized eval split and the retention set (the ones the ONNX
    artifacts ship) and the manifest, written last. llama.cpp reads the tokenizer from the GGUF itself, so no tokenizer files ship."""
    with atomic_dir(Path(out)) as tmp:
        for p in Path(built).glob("*.gguf"):
            shutil.copy2(p, tmp / p.name)
        shutil.copy2(eval_file, tmp / EVAL_FILE)
        general = Path(eval_file).parent / RETENTION_FILE  # scored by llama.cpp as the ONNX artifacts score it
        if general.is_file():
            shutil.copy2(general, tmp / RETENTION_FILE)
        _write_manifest(tmp, manifest)
    return Path(out)


def stamp_genai_config(folder, target: dict) -> None:
    """genai_config.json names the target's EP with its provider options (where the builder has not already) and,
    in the session log_id, the target and precision: onnxruntime-genai rejects unknown keys, log_id is free text."""
    path = Path(folder) / "genai_config.json"
    cfg = json.loads(path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["log_id"] = f"onnxruntime-genai {target['name']} {target['precision']} {target['ep']}"
    # the target's own session defaults; a string value that is not an onnxruntime-genai option is passed to ONNX
    # Runtime as a session config entry (e.g. session.intra_op.allow_spinning)
    so.update(target.get("session_options") or {})
    named = [p for entry in so.get("provider_options", []) for p in entry]
    if target["provider"] != "cpu" and target["provider"] not in named:
        so["provider_options"] = [{target["provider"]: {k: str(v) for k, v in target.get("provider_options", {}).items()}}]
    path.write_text(json.dumps(cfg, indent=4) + "\n")
