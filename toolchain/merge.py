"""Stage 2: merge a LoRA adapter into the full-precision base and check the merge changed nothing.

Writes an HF folder (safetensors, tokenizer, chat template, generation config) and merge_report.json with the
max-abs logit difference between base+adapter and the merged model on a few prompts; above 1e-3 it fails and
writes nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .errors import ToolchainError
from .fsutil import atomic_dir
from .hf import load_causal_lm, load_tokenizer, user_prompt
from .sources import resolve

TOLERANCE = 1e-3
PROMPTS = [
    "Hi, this is Ada Lovelace. I'd like 2 tickets for the Paris show on 3 May, please.",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
]


def adapter_dir(path: Path) -> Path:
    """Accept a finetune output folder (with adapter/ inside) or the adapter folder itself."""
    path = Path(path)
    for p in (path / "adapter", path):
        if (p / "adapter_config.json").is_file():
            return p
    raise ToolchainError(f"{path}: no adapter_config.json here or in {path}/adapter; pass the folder `toolchain finetune` wrote")


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def merge(model: str, adapter: Path, out: Path, model_path: Optional[str] = None, trust_remote_code: bool = False) -> dict:
    from peft import PeftModel

    adir = adapter_dir(adapter)
    src = resolve(model, model_path, trust_remote_code)
    cfg = json.loads((src.path / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise ToolchainError(f"{src.path}/config.json: the base is quantized ({cfg['quantization_config'].get('quant_method')}); "
                             "merge into the full-precision base weights instead (a merge into a quantized base loses the adapter's precision)")
    tok = load_tokenizer(adir if (adir / "tokenizer_config.json").is_file() else src.path, trust_remote_code)
    base = load_causal_lm(src.path, trust_remote_code)
    peft_model = PeftModel.from_pretrained(base, adir)
    peft_model.eval()

    texts = [user_prompt(tok, p) for p in PROMPTS]
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    before = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload()
    after = _logits(merged, batch)
    mask = batch["attention_mask"].bool()
    diff = float((before - after).abs()[mask].max())
    report = {"model": src.card.name, "adapter": str(adir), "max_abs_logit_diff": diff, "tolerance": TOLERANCE,
              "prompts": len(PROMPTS), "passed": diff <= TOLERANCE}
    if diff > TOLERANCE:
        raise ToolchainError(f"merge parity failed: max |logit diff| {diff:.2e} > {TOLERANCE:.0e} between base+adapter "
                             f"and the merged model; nothing written to {out}")
    with atomic_dir(Path(out)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report
