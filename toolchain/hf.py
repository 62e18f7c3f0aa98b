"""Loading HF models and tokenizers the safe way (safetensors only, remote code only on opt-in), and batching."""
from __future__ import annotations

from pathlib import Path

import torch

from .data import IGNORE


def bf16_fast() -> bool:
    """True where bf16 autocast pays off on this CPU: AMX tiles (oneDNN bf16 matmuls at several times fp32).

    With AVX512-BF16 alone oneDNN runs bf16 too, but measured on this project's 2-core AVX512-BF16 machine
    autocast made a LoRA step slower than fp32 (6.2 s vs 3.6 s on SmolLM2, batch 8): the casts cost more than the
    matmuls save. So "auto" means AMX; `bf16: on` in a recipe forces autocast wherever oneDNN supports bf16.
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def user_prompt(tok, text: str) -> str:
    """`text` as one user turn under the tokenizer's chat template (as is, for a model without one)."""
    if not tok.chat_template:
        return text
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def load_causal_lm(path: Path, trust_remote_code: bool = False, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    model.eval()
    return model


def collate(examples: list[dict], pad_id: int, left: bool = False) -> dict:
    """Pad a batch to its longest example; labels get IGNORE on padding."""
    n = max(len(e["input_ids"]) for e in examples)
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        k = n - len(e["input_ids"])
        pad = lambda xs, v: ([v] * k + xs) if left else (xs + [v] * k)  # noqa: E731
        out["input_ids"].append(pad(list(e["input_ids"]), pad_id))
        out["attention_mask"].append(pad([1] * len(e["input_ids"]), 0))
        out["labels"].append(pad(list(e.get("labels", e["input_ids"])), IGNORE))
    return {k: torch.tensor(v) for k, v in out.items()}
