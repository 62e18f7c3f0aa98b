"""Stage 6: assemble the artifact a user copies to a device.

    <target>/  the onnxruntime-genai folder (model, genai_config.json, tokenizer, chat template)
               eval.jsonl      the held-out split, tokenized, with the fp32 ONNX model's greedy tokens
               manifest.json   card, resolved recipe, package versions, input hashes, sha256 of every file,
                               stage lineage, how it was trained (method, precision, ranks, ZeRO stage),
                               reference metrics (torch base/tuned, fp32 ONNX)
Reports (report.json, report.md, report.png) are added by validation and are not hashed.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path

from .fsutil import atomic_dir
from .runtime import manifest as man_mod
from .runtime.validate import EVAL_FILE
from .targets import stamp_genai_config

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


def package(quantized: Path, eval_file: Path, out: Path, card: dict, recipe: dict, target: dict,
            lineage: list[dict], reference: dict, inputs: dict, training: dict) -> Path:
    """Copy the quantized folder and the tokenized eval split into `out`, then write manifest.json last."""
    with atomic_dir(Path(out)) as tmp:
        for p in Path(quantized).iterdir():
            if p.is_file() and p.name != "quantize_report.json":
                shutil.copy2(p, tmp / p.name)
        shutil.copy2(eval_file, tmp / EVAL_FILE)
        stamp_genai_config(tmp, target)
        manifest = {
            "format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model_card": card, "recipe": recipe, "target": target, "versions": versions(), "inputs": inputs,
            "training": training, "lineage": lineage, "reference": reference, "files": man_mod.file_hashes(tmp),
        }
        (tmp / man_mod.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out)
