"""The pre-flight fit check: will `toolchain edge` fit this machine? Estimated from the model's config.json and the
recipe before any stage runs, so a run that cannot fit stops at once with the fix named, instead of being
OOM-killed halfway through a stage.

Each stage's peak RAM is a multiple of the model's weights in the dtype that stage holds them (the coefficients
below), plus the fine-tune's activations and a fixed runtime overhead. Disk is what the stages write under --out.
Nothing here imports torch: the parameter count comes from config.json's shapes (config/shapes.py param_count).

The coefficients are estimates until the full-size Phi-3-mini bench calibrates them; each one's comment says what
it is based on today. The one full-size measurement so far (issue 14): the genai export of a 3.8B Phi-3-mini
(7.2 GB bf16) was OOM-killed at 24.3 GB RSS on a 24 GB machine, i.e. it needs more than 3.4x the bf16 bytes.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from toolchain.config.schema import Launch, Recipe
from toolchain.config.shapes import LARGE_MODEL_BYTES, attention_dims, param_count, weight_bytes
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.retention import GENERAL_BATCH

GB = 1024 ** 3

# ---------------------------------------------------------------- RAM coefficients (x weights at the stage's dtype)
# Python + torch + transformers (+ onnxruntime) imported, tokenizer, data: ~0.9-1.2 GB RSS measured on SmolLM2-135M
# stages, whose weights are 0.5 GB fp32.
RUNTIME_OVERHEAD = 1.0 * GB
# fine-tune, LoRA/DoRA/rsLoRA: the frozen base once (fp32, or bf16 with train.bf16: on), the adapters, AdamW
# states on them (< 1% of the base at r 16): 1.1x the base. Each DeepSpeed rank holds its own copy unless ZeRO-3.
FINETUNE_LORA = 1.1
# fine-tune, full: fp32 weights + fp32 grads + AdamW's two fp32 moments = 16 bytes/param, x 1.1 for buffers.
FINETUNE_FULL_BYTES_PER_PARAM = 16 * 1.1
# QLoRA: NF4 linear weights (4 bits + one fp32 absmax per 64, double-quantized: ~0.53 bytes/param) plus the
# embeddings and LM head kept in bf16; 1.25x for bitsandbytes' load-time bf16 layer buffers.
NF4_BYTES_PER_PARAM = 0.53
QLORA_LOAD = 1.25
# activations kept for backward, bytes per token per layer per hidden unit at 16 bits (Korthikanti et al. 2022,
# "Reducing activation recomputation": 34 s b h per layer, plus 5 a s^2 b for attention); fp32 doubles it.
# With gradient checkpointing only each layer's input stays (2 bytes per hidden unit at 16 bits), plus one layer.
ACT_PER_HIDDEN = 34
ACT_ATTENTION = 5
ACT_CHECKPOINTED_PER_HIDDEN = 2
# the LM head's logits over the vocabulary, fp32, kept for the loss and its gradient (logits, log-softmax, grad)
LOGIT_COPIES = 3
# the fine-tune's one-time generations from an empty TOOLCHAIN_HOME (replay answers, base scores) hold the base in
# its working dtype (fp32; a large model's own) and a KV cache: GENERAL_BATCH general prompts of at most this many
# tokens with their answers (the system prompt and a question: under 64 tokens for SmolLM2 and Phi-3, + 48 new), or a
# metric batch of held-out prompts (max_length + max_new_tokens). Phi-3-mini in bf16, 16 replay prompts: 8.2 GB.
GENERAL_TOKENS = 128
# merge: the fp32 base with the adapter merged in place, plus one safetensors shard (<= 5 GB) serialized at save.
MERGE_FP32 = 1.0
SAVE_SHARD_BYTES = 5 * GB
# export (builder or Optimum): the fp32 torch model plus the fp32 ONNX initializers it writes: 2x fp32
# (= 4x bf16 bytes; consistent with the >3.4x bf16 OOM-kill above). Parity then loads ONNX and torch in turn.
EXPORT_FP32 = 2.0
# reference: an fp32 ONNX Runtime session over the export, with prepacked MatMul weights: 1.5x fp32 (code reading).
REFERENCE_FP32 = 1.5
# quantize (MatMulNBits): the fp32 ONNX graph loaded by onnx, plus the quantized weights it makes: 1.3x fp32.
QUANTIZE_FP32 = 1.3
# validate: an ONNX Runtime GenAI session over the artifact's weights, 1.5x the artifact (prepacking, KV cache).
VALIDATE_ARTIFACT = 1.5

# The large-model path (weights over config.shapes.LARGE_MODEL_BYTES; pipeline.py): every stage holds the weights in
# their own dtype (bf16 for Phi-3-mini), at most once. Multiples of those bytes (plus RUNTIME_OVERHEAD), measured on
# a random-weight Phi-3-mini, 7.6 GB in bf16, chat-lora with batch 2 (bench/phi3_full.py,
# bench/results/phi3-full-2026-12-02.md; in one process, so a stage's peak includes what the last one left):
# finetune LoRA 10.2 GB (the estimate above: 10.3), QLoRA 6.9 GB (6.6), merge 7.0 GB, reference 9.8 GB, build 10.9 GB.
LARGE_MERGE = 0.8  # one shard merged in memory (file pages of the next mapped as read); the 2-layer parity check
LARGE_REFERENCE = 1.15  # the merged torch model, mmap'd, and the eval batch's activations and logits
LARGE_BUILD = 1.3  # the torch model mapped in by the builder, plus the int4 weights it makes and saves

# ---------------------------------------------------------------- disk (bytes per parameter written under --out)
# merged: fp32 safetensors (the merge stage saves its fp32 model). export: fp32 ONNX. A full fine-tune also writes
# its fp32 weights and a resumable checkpoint (weights + AdamW moments).
MERGED_BYTES_PER_PARAM = 4
EXPORT_BYTES_PER_PARAM = 4
FULL_FINETUNE_BYTES_PER_PARAM = 4 + 12
# the artifact's weights: int4 blocks of 32 with an fp32 scale (0.625 bytes/param), int8 (1.125), fp32 (4); the
# token embedding (a Gather) stays fp32. The quantize stage and the artifact each hold a copy.
TARGET_BYTES_PER_PARAM = {"int4": 0.625, "int8": 1.125, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Need:
    stage: str
    ram: float  # peak bytes
    disk: float  # bytes written under --out
    basis: str  # what the estimate counts, for the message


def _params(cfg: dict) -> tuple[int, int]:
    """(all parameters, those in the decoder layers' Linear weights): QLoRA quantizes only the latter."""
    total = param_count(cfg)
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    rest = vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + h * (1 + 2 * cfg["num_hidden_layers"])
    return total, total - rest


def _activations(cfg: dict, rec: Recipe, per_rank_batch: float, dtype_bytes: int) -> float:
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    s = rec.data.max_length
    b = per_rank_batch
    scale = dtype_bytes / 2
    one_layer = s * b * (ACT_PER_HIDDEN * h + ACT_ATTENTION * cfg["num_attention_heads"] * s) * scale
    if rec.train.gradient_checkpointing:
        kept = layers * s * b * ACT_CHECKPOINTED_PER_HIDDEN * h * scale + one_layer
    else:
        kept = layers * one_layer
    return kept + LOGIT_COPIES * s * b * vocab * 4


def _kv_bytes(cfg: dict, dtype_bytes: int) -> int:
    """The KV cache's bytes per token of one sequence: keys and values of every layer."""
    _, kv_heads, head_dim = attention_dims(cfg)
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def estimate(cfg: dict, rec: Recipe, target: str, launch: Launch = Launch()) -> list[Need]:
    """Peak RAM and disk of each stage of `toolchain edge` for a decoder config.json, a recipe and a target."""
    total, linear = _params(cfg)
    ranks_here = launch.nproc if launch.launcher == "deepspeed" else 1
    world = ranks_here * (launch.nnodes if launch.launcher == "deepspeed" else 1)
    zero3 = launch.launcher == "deepspeed" and launch.zero == 3
    method = rec.method.type
    own = weight_bytes(cfg)
    large = own > LARGE_MODEL_BYTES  # trains in the weights' own dtype, never fp32 (pipeline.py)
    bf16 = (rec.train.bf16 == "on" or large) and world == 1  # "auto" counted as fp32 (the conservative case)
    dtype_bytes = 2 if bf16 else 4
    micro = rec.train.batch_size / rec.train.grad_accum / world
    act = _activations(cfg, rec, micro, dtype_bytes) * ranks_here
    # what one node holds of the model's states: ZeRO-3 shards them over every rank; otherwise each rank has a copy
    copies = ranks_here / world if zero3 else ranks_here
    if method == "full":
        states, what = total * FINETUNE_FULL_BYTES_PER_PARAM, "full fine-tune, fp32 weights + grads + AdamW"
    elif method == "qlora":
        states = (linear * NF4_BYTES_PER_PARAM + (total - linear) * 2) * QLORA_LOAD
        what = "QLoRA on an NF4 base"
    else:
        states, what = total * dtype_bytes * FINETUNE_LORA, f"{method} on a {'bf16' if bf16 else 'fp32'} base"
    launch_note = (f", {ranks_here} DeepSpeed ranks here (ZeRO-{launch.zero}"
                   f"{f' over {world} ranks' if zero3 else ', a copy each'})" if launch.launcher == "deepspeed" else "")
    fp32 = total * 4
    precision = _target_precision(target)
    art = linear * TARGET_BYTES_PER_PARAM[precision] + (total - linear) * 4
    ft_disk = total * FULL_FINETUNE_BYTES_PER_PARAM if method == "full" else 0
    train = states * copies + act
    generate = (own if large else fp32) + _kv_bytes(cfg, 2 if large else 4) * max(
        GENERAL_BATCH * GENERAL_TOKENS, rec.metric.batch_size * (rec.data.max_length + rec.metric.max_new_tokens))
    finetune = Need("finetune", RUNTIME_OVERHEAD + max(train, generate), ft_disk,
                    f"{what}, max_length {rec.data.max_length}, batch {rec.train.batch_size}"
                    f"{' / ' + str(rec.train.grad_accum) + ' micro-batches' if rec.train.grad_accum > 1 else ''}"
                    f"{', gradient checkpointing' if rec.train.gradient_checkpointing else ''}{launch_note}"
                    + (f"; before training, the base answers the replay and held-out prompts in "
                       f"{'its own dtype' if large else 'fp32'}, batches of {GENERAL_BATCH}" if generate > train else ""))
    if large:
        return [
            finetune,
            Need("merge", RUNTIME_OVERHEAD + own * LARGE_MERGE, own, "shard by shard in the weights' own dtype"),
            Need("reference", RUNTIME_OVERHEAD + own * LARGE_REFERENCE, 0, "the merged torch model in its own dtype"),
            Need("quantize", RUNTIME_OVERHEAD + own * LARGE_BUILD, art, f"the builder, {precision} as built"),
            Need("package", RUNTIME_OVERHEAD, art, "the artifact's files copied"),
            Need("validate", RUNTIME_OVERHEAD + art * VALIDATE_ARTIFACT, 0, f"an ONNX Runtime session over the {precision} artifact"),
        ]
    return [
        finetune,
        Need("merge", RUNTIME_OVERHEAD + fp32 * MERGE_FP32 + min(fp32, SAVE_SHARD_BYTES),
             total * MERGED_BYTES_PER_PARAM, "the fp32 model, adapter merged in, saved as safetensors"),
        Need("export", RUNTIME_OVERHEAD + fp32 * EXPORT_FP32, total * EXPORT_BYTES_PER_PARAM,
             "the fp32 torch model and its fp32 ONNX copy"),
        Need("reference", RUNTIME_OVERHEAD + fp32 * REFERENCE_FP32, 0, "an fp32 ONNX Runtime session"),
        Need("quantize", RUNTIME_OVERHEAD + fp32 * QUANTIZE_FP32, art, f"the fp32 ONNX graph quantized to {precision}"),
        Need("package", RUNTIME_OVERHEAD, art, "the artifact's files copied"),
        Need("validate", RUNTIME_OVERHEAD + art * VALIDATE_ARTIFACT, 0, f"an ONNX Runtime session over the {precision} artifact"),
    ]


def _target_precision(target: str) -> str:
    """The weights' precision a target ships: cpu-int4 -> int4; auto and unknown names count the widest, int8."""
    for p in TARGET_BYTES_PER_PARAM:
        if target.endswith(p):
            return p
    return "int8"


def mem_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo, in bytes; None where there is no /proc (the RAM check is then skipped)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def disk_free(out: Path) -> int:
    """Free bytes on the file system --out will be on (its nearest existing parent)."""
    p = Path(out).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def _fixes(need: Need, rec: Recipe, launch: Launch, peak: float) -> str:
    """The fixes for one stage over the RAM; the machine named holds every stage (peak: the largest estimate)."""
    fixes = []
    if need.stage == "finetune":
        if rec.method.type != "qlora":
            fixes.append("QLoRA (--method qlora)")
        fixes.append("a smaller batch or max_length (--set train.batch_size=1 --set data.max_length=128)")
        if not rec.train.gradient_checkpointing:
            fixes.append("--set train.gradient_checkpointing=true")
        if not (launch.launcher == "deepspeed" and launch.zero == 3):
            fixes.append("DeepSpeed ZeRO-3 sharding over several nodes (--launcher deepspeed --zero 3 --nnodes N)")
    fixes.append(f"a machine with at least {math.ceil(peak / GB)} GB of available RAM (every stage)")
    return ", ".join(fixes)


def check_fit(model_dir: Path, rec: Recipe, target: str, out: Path, launch: Launch = Launch(),
              available: Optional[int] = None, free: Optional[int] = None) -> list[Need]:
    """Raise ToolchainError, one line naming the stage, the estimate, what is available and the fixes, when a stage
    of `toolchain edge` will not fit this machine's available RAM or the free disk at `out`; else the estimates.
    `available` and `free` default to MemAvailable and the free space at `out`."""
    cfg_file = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ToolchainError(f"{cfg_file}: cannot read the model's config for the fit check: {e}") from None
    needs = estimate(cfg, rec, target, launch)
    available = mem_available() if available is None else available
    free = disk_free(out) if free is None else free
    if available is not None:
        for n in needs:
            if n.ram > available:
                raise ToolchainError(
                    f"will not fit: the {n.stage} stage needs about {n.ram / GB:.1f} GB of RAM ({n.basis}; "
                    f"{param_count(cfg) / 1e9:.2f}B parameters) but {available / GB:.1f} GB is available; fixes: "
                    f"{_fixes(n, rec, launch, max(x.ram for x in needs))}; estimates from toolchain/config/fit.py (--no-fit-check "
                    f"runs anyway)")
    disk = sum(n.disk for n in needs)
    if disk > free:
        raise ToolchainError(
            f"will not fit: the stages write about {disk / GB:.1f} GB under {out} (fp32 merged model and export, "
            f"the artifact) but {free / GB:.1f} GB is free there; fixes: --out on a disk with at least "
            f"{math.ceil(disk / GB)} GB free, or free space (--no-fit-check runs anyway)")
    return needs
