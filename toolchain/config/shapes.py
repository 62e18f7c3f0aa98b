"""The Phi cards' real architectures: the key fields of each model's published config.json, in one table.

Tests build tiny random models of the same *kind* from these (tests/conftest.py `make_tiny_phi`), the full-size
memory bench builds exact shapes (`phi3_config(card)`); `param_count` counts any such config.json's parameters (the
pre-flight fit check, config/fit.py, runs it on the model's own config). The values were written from memory of
the published config.json files of the Hugging Face repositories the cards name (no hub access on the machine that
wrote them); tests/test_phi_family.py checks the counts against the published sizes (3.82B, 13.96B, 3.84B). The
dimensions, head counts, vocabulary, context lengths, rope theta, partial rotary factor and tying are the
published ones; the LongRoPE short/long factor *values* are not reproduced (each list has the published length,
head_dim x partial / 2 = 48, and the published form, near 1 short and rising long, as a ramp): exact shapes,
approximate rotary numerics.
"""
from __future__ import annotations

from toolchain.runtime.errors import ToolchainError

# Shared by every Phi-3-architecture card (Phi3ForCausalLM, model_type phi3).
_COMMON = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu", "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "torch_dtype": "bfloat16"}

PHI = {
    "phi-3-mini": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                   "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                   "rope_scaling": None, "sliding_window": 2047, "tie_word_embeddings": False,
                   "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000},
    "phi-3-mini-128k": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                        "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                        "rope_scaling": "longrope", "sliding_window": 262144, "tie_word_embeddings": False,
                        "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000},
    "phi-3-medium": {"hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
                     "num_attention_heads": 40, "num_key_value_heads": 10, "vocab_size": 32064,
                     "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
                     "rope_scaling": None, "sliding_window": 2047, "tie_word_embeddings": False,
                     "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000},
    "phi-3.5-mini": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
                     "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                     "rope_scaling": "longrope", "sliding_window": 262144, "tie_word_embeddings": False,
                     "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000},
    "phi-4-mini": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
                   "num_attention_heads": 24, "num_key_value_heads": 8, "vocab_size": 200064,
                   "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                   "rope_scaling": "longrope", "partial_rotary_factor": 0.75, "sliding_window": 262144,
                   "tie_word_embeddings": True,
                   "bos_token_id": 199999, "eos_token_id": 199999, "pad_token_id": 199999},
}


def longrope(head_dim: int, partial_rotary_factor: float = 1.0) -> dict:
    """A LongRoPE rope_scaling of the right length (rotary dims / 2) for a head: short factors near 1, long
    factors rising from 1 to 40, the published lists' form (not their values)."""
    n = int(head_dim * partial_rotary_factor) // 2
    return {"type": "longrope", "short_factor": [1.0 + 0.5 * i / max(n - 1, 1) for i in range(n)],
            "long_factor": [1.0 + 39.0 * (i / max(n - 1, 1)) ** 2 for i in range(n)]}


def phi3_config(card: str, **changes) -> dict:
    """config.json fields for transformers' Phi3Config: the card's real shape, with `changes` applied (a tiny
    model: fewer layers, narrower, another vocabulary). rope_scaling "longrope" becomes factor lists sized for the
    resulting head."""
    if card not in PHI:
        raise ToolchainError(f"no recorded shape for '{card}'; shapes exist for: {', '.join(PHI)}")
    cfg = {**_COMMON, **PHI[card], **changes}
    if cfg.get("rope_scaling") == "longrope":
        cfg["rope_scaling"] = longrope(attention_dims(cfg)[2], cfg.get("partial_rotary_factor", 1.0))
    return cfg


def attention_dims(cfg: dict) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) from config.json fields; without num_key_value_heads every query
    head has its own (no GQA), without head_dim the heads split hidden_size."""
    heads = cfg["num_attention_heads"]
    return heads, cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or cfg["hidden_size"] // heads


def param_count(cfg: dict) -> int:
    """Parameters of a Llama/Phi-3-style decoder from its config.json fields alone: embeddings, per layer the
    attention (q, k, v, o), the gated MLP (gate, up, down) and two norms, the final norm and an LM head unless tied.
    Exact for Phi3ForCausalLM (no biases); within a few per cent for other Llama-like decoders."""
    try:
        h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        heads, vocab = cfg["num_attention_heads"], cfg["vocab_size"]
    except KeyError as e:
        raise ToolchainError(f"config.json lacks {e.args[0]}; cannot count the model's parameters") from None
    _, kv, head_dim = attention_dims(cfg)
    attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
    mlp = 3 * h * inter
    per_layer = attn + mlp + 2 * h
    head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    return vocab * h + layers * per_layer + h + head


# Above this much weight on disk the chain works in the weights' own dtype and never makes an fp32 copy (the
# pipeline's large-model path): an fp32 Phi-3-mini (7.6 GB in bf16) is 15 GB, twice what its stages may hold.
LARGE_MODEL_BYTES = 2 * 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def config_dtype_name(cfg: dict) -> str:
    """The weights' dtype as config.json names it: `dtype` (transformers >= 4.56 writes it) or the older
    `torch_dtype`; float32 when it names none."""
    return cfg.get("dtype") or cfg.get("torch_dtype") or "float32"


def weight_bytes(cfg: dict) -> int:
    """The weights' size in the dtype config.json names."""
    return param_count(cfg) * DTYPE_BYTES.get(config_dtype_name(cfg), 4)

