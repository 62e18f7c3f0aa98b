"""Loading HF models and tokenizers the safe way (safetensors only, remote code only on opt-in), and batching."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from toolchain.config.shapes import LARGE_MODEL_BYTES  # above it: the weights' own dtype, never an fp32 copy
from toolchain.hf.data import IGNORE

BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much on the probe to be used


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def is_large(model_dir: Path) -> bool:
    """More than LARGE_MODEL_BYTES of weights: the chain never makes an fp32 copy of it (pipeline.py)."""
    return weights_bytes(model_dir) > LARGE_MODEL_BYTES


def config_dtype(model_dir: Path) -> torch.dtype:
    """The dtype config.json names for the weights (config.shapes.config_dtype_name)."""
    import json

    from toolchain.config.shapes import config_dtype_name

    name = config_dtype_name(json.loads((Path(model_dir) / "config.json").read_text()))
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def working_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the fine-tune and the torch reference load `model_dir` in: fp32, or for a model larger than
    LARGE_MODEL_BYTES the weights' own (config_dtype)."""
    return config_dtype(model_dir) if is_large(model_dir) else torch.float32


def bf16_fast() -> bool:
    """True where this CPU multiplies bf16 faster than fp32, measured once per CPU model and torch version (cached
    in TOOLCHAIN_HOME/host/), so the fast path never depends on a flag list: a LoRA-sized matmul in both dtypes.

    Measured on an AMD EPYC (AVX512-BF16), torch 2.13, 2 threads: fp32 38.6 ms, bf16 15.6 ms (2.5x). With oneDNN and
    ATen held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2, as on an AVX2-only EPYC) bf16 took 2187 ms
    against 72 ms: there a bf16 base or QLoRA compute dtype made steps 30x slower. (Earlier, on an AVX512-BF16 Intel,
    a SmolLM2 LoRA step's matmuls took 16.8 s in bf16 against 41.9 s in fp32.)
    """
    import hashlib
    import json
    import os
    import platform

    from toolchain.config.catalog import home
    from toolchain.runtime.host import cpuinfo

    if not torch.backends.mkldnn.is_available():
        return False
    env = {k: os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    key = hashlib.sha256(json.dumps([cpuinfo()["model"], torch.__version__, platform.machine(), env,
                                     torch.get_num_threads()]).encode()).hexdigest()[:16]
    cache = home() / "host" / f"bf16-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["bf16_fast"]
    fp32, bf16 = _matmul_s(torch.float32), _matmul_s(torch.bfloat16)
    fast = fp32 / bf16 >= BF16_MIN_SPEEDUP
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"bf16_fast": fast, "fp32_s": fp32, "bf16_s": bf16, "cpu": cpuinfo()["model"],
                               "torch": torch.__version__, "env": env}))
    os.replace(tmp, cache)
    return fast


def _matmul_s(dtype, reps: int = 4) -> float:
    """Seconds per [512 x 576] @ [576 x 1536] product (a LoRA step's projection at SmolLM2's width), best of reps."""
    import time

    x, w = torch.randn(512, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    x @ w  # warm-up: the first call builds oneDNN's kernel
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - t0)
        if best > 0.5:  # emulated bf16 (no hardware support): one slow product says enough
            break
    return best


def compute_dtype(name: str) -> str:
    """A recipe's QLoRA compute dtype, with "auto" resolved: bfloat16 where the CPU runs it fast (or on CUDA),
    else float32."""
    if name != "auto":
        return name
    return "bfloat16" if torch.cuda.is_available() or bf16_fast() else "float32"


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


def load_causal_lm(path: Path, trust_remote_code: bool = False, dtype=torch.float32, layers: Optional[int] = None):
    """layers: only the first `layers` decoder layers (and the embeddings, final norm and head): a cheap check.
    transformers' warning about the other layers' weights, left unused on purpose, is not shown then."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    extra = {"num_hidden_layers": layers} if layers else {}
    level = hf_logging.get_verbosity()
    if layers:
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **extra
        )
    finally:
        hf_logging.set_verbosity(level)
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
