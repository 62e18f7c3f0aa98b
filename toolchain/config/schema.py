"""The one schema for model cards (models/*.yaml) and recipes (recipes/*.yaml).

Unknown keys are errors: a typo in a recipe must not silently fall back to a default.
`load_yaml(path, Model)` names the file and the key path of every problem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Type, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolchain.runtime.errors import ToolchainError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- model cards
class Source(Strict):
    """Where the weights come from. Exactly one of the three."""

    hub: Optional[str] = None  # a hub id, read from the local HF cache (or downloaded when online)
    path: Optional[str] = None  # a local HF folder
    package: Optional[str] = None  # an installed Python package that ships the weights (found, never imported)
    package_path: Optional[str] = None  # inside that package: a .gguf file or an HF folder
    pip: Optional[str] = None  # how to install that package, for the error message

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("hub", "path", "package") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hub, path, package (got {given or 'none'})")
        if self.package and not self.package_path:
            raise ValueError("package needs package_path")
        return self


class ModelCard(Strict):
    name: str
    description: str = ""
    architecture: str  # HF model_type: llama, phi3, bert, ...
    kind: Literal["decoder", "encoder"] = "decoder"
    params: str  # human-readable count, e.g. "135M"
    source: Source
    license: str
    base_model: Optional[str] = None  # its Hugging Face Hub id, for the artifact's README (default: source.hub)
    context_length: int = Field(gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    chat_template: Literal["tokenizer", "gguf", "none"] = "tokenizer"  # where the chat template comes from
    lora_target_modules: list[str] = Field(default_factory=list)
    exporter: Literal["genai", "optimum"] = "genai"  # default ONNX exporter, chosen by measurement
    trust_remote_code: bool = False  # the model needs remote code; the user must still opt in on the CLI
    requires: list[str] = Field(default_factory=list)  # extra Python packages the model needs (e.g. tiktoken)
    notes: str = ""


# -------------------------------------------------------------------- recipes
class ReplaySpec(Strict):
    """Replay: the base model's own greedy answers to general prompts (self-distillation), asked under a generic
    system prompt and mixed into the task's training data, so the tuned model keeps behaving like the base outside
    the task. Generated at fine-tune time, cached by content (base weights, prompts, these settings)."""

    # of the training examples; 0 = no replay. Measured on chat-lora (docs/finetuning.md): 0.25 keeps 0.87 of the
    # base's retention in cpu-int4 (0 keeps 0.30), 0.5 keeps 0.91 but its int4 exact match falls to 0.82 of tuned
    fraction: float = Field(0.25, ge=0, lt=1)
    prompts: Optional[str] = None  # JSONL of {"prompt": ...}, relative to the recipe file; default the shipped set
    max_new_tokens: int = Field(48, gt=0)  # an answer cut there keeps its whole sentences only


class DataSpec(Strict):
    train: str  # JSONL, relative to the recipe file
    eval: Optional[str] = None  # held-out JSONL; without it, eval_fraction of train is held out
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_length: int = Field(256, gt=8)
    packing: bool = False
    origin: str  # where the data comes from (script, corpus)
    license: str
    replay: ReplaySpec = Field(default_factory=ReplaySpec)  # decoders only


class MethodSpec(Strict):
    """What is trained. lora: low-rank adapters on the fp32 base. qlora: the same on a bitsandbytes NF4 base
    (merged later into the full-precision base). dora: weight-decomposed LoRA. rslora: LoRA scaled by
    alpha/sqrt(r), steadier at high rank. full: every weight (small models only)."""

    type: Literal["lora", "qlora", "dora", "rslora", "full"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Optional[list[str]] = None  # default: the model card's lora_target_modules
    # qlora only: the 4-bit base
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 where the CPU runs it faster (measured)
    # what a QLoRA adapter is merged into: the full-precision base ("base"), or the NF4 weights it trained on,
    # dequantized to full precision ("dequantized": no 4-bit rounding of the adapter, but the base's NF4 error stays)
    merge_into: Literal["base", "dequantized"] = "base"


class TrainSpec(Strict):
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)  # examples per optimizer step, over all micro-batches and ranks
    grad_accum: int = Field(1, gt=0)  # micro-batches per step (per rank); batch_size must divide evenly
    sort_micro_batches: bool = False  # sort a step's examples by length before cutting them: less padding, same gradient
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 0
    bf16: Literal["auto", "on", "off"] = "auto"  # bf16 frozen base weights; auto = where the CPU runs bf16 faster (measured)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    checkpoint_every: int = Field(10, ge=0)  # steps between resumable checkpoints; 0 = none


class MetricSpec(Strict):
    # The headline metric; runtime/metrics.py FAMILIES lists the figures reported with each.
    name: Literal["exact_match", "perplexity", "accuracy", "macro_f1", "chrf", "bleu", "token_f1", "constraint_rate",
                  "entity_f1"]
    max_new_tokens: int = Field(48, gt=0)
    eval_limit: int = Field(64, gt=0)  # held-out examples scored by generation
    batch_size: int = Field(16, gt=0)


class QuantizeSpec(Strict):
    """cpu-int4 settings (MatMulNBits)."""

    algo: Literal["rtn", "hqq", "k_quant"] = "rtn"
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = True
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4  # 4: int8 activations in the CPU kernel
    lm_head: bool = True  # quantize the output projection too
    lm_head_bits: Literal[4, 8] = 4  # its width when quantized: 8 keeps more of the logits' precision
    # the token embedding table: fp32 Gather, or int4 GatherBlockQuantized (same block size and symmetry). int4:
    # SmolLM2 cpu-int4 202 -> 107 MB with held-out Δperplexity +16.3% vs +17.0% (bench/results/decode-tune-*.json).
    # chat-lora sets it; the default stays fp32 so the other recipes keep the gates they were measured against.
    embedding: Literal["fp32", "int4"] = "fp32"
    # mixed int4/int8: these projections in 8-bit MatMulNBits in every decoder layer (qkv_proj also names separate
    # q/k/v projections), and the first and last `int8_edge_layers` layers wholly in 8-bit. The KL-sensitive parts of
    # SmolLM2: qkv, down, o and the edge layers (bench/decode.py MIXED; bench/results/decode-*.json, "mixed" rows).
    int8: list[Literal["qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]] = []
    int8_edge_layers: int = Field(0, ge=0)
    # the lm_head on the last position only (what onnxruntime-genai's builder calls prune_lm_head): a 512-token SmolLM2
    # prompt prefilled 14-25% faster. The model then gives no logits for the other positions, so the validator scores
    # perplexity one token at a time (slower) and prompt-lookup decoding cannot check drafts.
    prune_lm_head: bool = False


class Gates(Strict):
    """What an artifact must meet; `toolchain validate` exits non-zero and names each gate it misses."""

    max_perplexity_increase_pct: Optional[float] = Field(None, ge=0)  # vs the tuned torch model
    min_metric_fraction: Optional[float] = Field(None, gt=0, le=1)  # task metric as a fraction of tuned torch
    min_decode_tok_s: Optional[float] = Field(None, gt=0)
    max_latency_ms_p95: Optional[float] = Field(None, gt=0)  # encoders: one sequence end to end, p95
    min_token_agreement_fp32: Optional[float] = Field(None, gt=0, le=1)  # greedy tokens equal to the fp32 ONNX model's
    min_retention: Optional[float] = Field(None, gt=0)  # decoders: retention as a fraction of the base torch model's


class Recipe(Strict):
    name: str
    # chat / completion / domain train a decoder; classify and ner may also name an encoder card (kind: encoder).
    task: Literal["chat", "completion", "domain", "classify", "ner", "translate", "qa", "creative"]
    description: str = ""
    model: str = "smollm2-135m"  # the default model card for this recipe
    data: DataSpec
    method: MethodSpec = Field(default_factory=MethodSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    metric: MetricSpec
    quantize: QuantizeSpec = Field(default_factory=QuantizeSpec)
    gates: Gates = Field(default_factory=Gates)
    target: Optional[str] = None  # the target `edge` builds when none is given (default cpu-int4; encoders cpu-int8)


class Launch(Strict):
    """How the fine-tune runs: one process, or DeepSpeed ranks started by torch.distributed.run (the command line's
    --launcher, --nproc, --zero, --nnodes, --node-rank, --rdzv-endpoint)."""

    launcher: Literal["none", "deepspeed"] = "none"
    nproc: int = Field(2, ge=1)  # ranks per node
    zero: int = Field(2, ge=0)  # the ZeRO stage: recipes/deepspeed/zero<N>.json must exist
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: Optional[str] = None  # HOST:PORT of node 0, for nnodes > 1


T = TypeVar("T", bound=BaseModel)


def load_yaml(path: Path, model: Type[T]) -> T:
    """Parse and validate one YAML file; every error names the file and the key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ToolchainError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ToolchainError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ToolchainError(f"{path}: expected a mapping of keys at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key (check the spelling against the schema)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{path}: key '{key}': {msg}")
        raise ToolchainError("\n".join(lines)) from None
