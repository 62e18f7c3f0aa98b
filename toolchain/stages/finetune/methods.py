"""The recipe's `method:` as a trainable model: LoRA, QLoRA (NF4 base), DoRA, rsLoRA or a full fine-tune.

All of it is PEFT and bitsandbytes; this module only maps recipe keys onto their configs and decides which
weights stay frozen in which dtype.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from toolchain.hf.models import compute_dtype
from toolchain.runtime.errors import ToolchainError
from toolchain.config.schema import MethodSpec

def lora_config(method: MethodSpec, default_targets):
    from peft import LoraConfig

    targets = method.target_modules or default_targets or "all-linear"
    targets = "all-linear" if targets == ["all-linear"] else targets
    return LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=targets,
                      task_type="CAUSAL_LM", use_dora=method.type == "dora", use_rslora=method.type == "rslora")


def load_nf4(path: Path, method: MethodSpec, trust_remote_code: bool = False):
    """The base in 4 bits (bitsandbytes NF4, double quantization), for QLoRA; CPU or CUDA."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method.quant_type,
                             bnb_4bit_use_double_quant=method.double_quant,
                             bnb_4bit_compute_dtype=getattr(torch, compute_dtype(method.compute_dtype)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        net = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map=device, dtype=torch.float32,
                                                   use_safetensors=True, trust_remote_code=trust_remote_code)
    except (ImportError, RuntimeError) as e:
        raise ToolchainError(f"method 'qlora' needs bitsandbytes with 4-bit support on {device}: {e}") from None
    net.eval()
    return net


def trainable(net, method: MethodSpec, default_targets, bf16_base: bool, checkpointing: bool):
    """Wrap a loaded model for training by `method`. bf16_base stores the frozen base weights in bf16 while the
    trained weights stay fp32 (PEFT computes the adapter in its own dtype)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if not torch.cuda.is_available():
        _eager_attention(net)
    if method.type == "full":
        if bf16_base:
            raise ToolchainError("recipe key 'train.bf16': a full fine-tune trains every weight in fp32; set bf16: off")
        for p in net.parameters():
            p.requires_grad_(True)
        if checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return net
    if method.type == "qlora":
        net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=checkpointing,
                                              gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.enable_input_require_grads()
    if bf16_base and method.type != "qlora":
        net.to(torch.bfloat16)
    return get_peft_model(net, lora_config(method, default_targets))


@contextmanager
def folded(net, method: MethodSpec):
    """The adapter added into the base weights while the block runs (PEFT merge_adapter, undone on exit), for
    scoring: a generation step then runs one matmul per projection instead of three. Measured on a 2-core AVX2 EPYC
    (SmolLM2, LoRA r16): the 64 held-out exact-match generations 68 -> 50 s. The scores are those of the merged model the
    export ships. QLoRA keeps its adapter apart (merging into NF4 weights would round them), as does a full
    fine-tune, which has none. Unfolding gives fp32 weights back to within rounding, but changed 30% of a bf16
    Linear's weights by a unit in the last place (PEFT 0.21, r=8): score with the adapter off before folding."""
    if method.type in ("qlora", "full") or not hasattr(net, "merge_adapter"):
        yield net
        return
    net.merge_adapter()
    try:
        yield net
    finally:
        net.unmerge_adapter()


def _eager_attention(net) -> None:
    """Plain matmul attention for training on a CPU. Measured on SmolLM2 (batch 8 x ~113 tokens, one thread, torch
    profiler): the CPU SDPA flash kernel's backward took 23% of a LoRA step, eager's bmm + softmax 8%. Same math."""
    try:
        net.set_attn_implementation("eager")
    except (AttributeError, ValueError):
        pass  # a model without the switch keeps its own attention
