"""Loading HF models and tokenizers the safe way (safetensors only, remote code only on opt-in), and batching."""
from __future__ import annotations

from pathlib import Path

import torch

from toolchain.hf.data import IGNORE


def bf16_fast() -> bool:
    """True where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 frozen base weights pay off.

    Measured on this project's 2-core AVX512-BF16 machine (SmolLM2 LoRA step, one thread, torch profiler): the
    step's matmuls took 16.8 s in bf16 against 41.9 s in fp32. (bf16 *autocast* of the whole step measured slower
    than fp32 earlier: it casts every activation; a bf16 base casts only at the fp32 adapters.)
    """
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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
