"""npu-qdq: static QDQ quantization of the fp32 export for NPUs (QNN HTP, VitisAI, OpenVINO), with ONNX Runtime's
QNN helpers, calibrated on the recipe's train split.

    1. qnn_preprocess_model       ORT's QNN preparation (fusions; names every node)
    2. get_qnn_qdq_config         QNN's static QDQ config: uint16 activations, uint8 weights (A16W8), MinMax
                                  calibration over CALIB_SAMPLES train conversations run through the model as a
                                  prefill (empty KV cache)
    3. quantize                   QuantizeLinear/DequantizeLinear pairs around every op the quantizer knows, except
                                  the nodes that read the KV cache inputs or write the present outputs (the
                                  builder's GroupQueryAttention): those are excluded (nodes_to_exclude), so the KV
                                  cache, the rotary cos/sin caches and attention itself stay float

Why the KV cache stays float: calibration runs prefills, whose past_key_values are empty, so MinMax gave the
past tensors a range of [0, 0] (scale 1.5e-9, zero point 0). Prefill never reads them, so perplexity matched fp32;
every decode step reads the whole cache through that Q/DQ pair, which crushed it to ~0: greedy tokens agreed with
fp32 at 0 of 12 decode steps while the same positions in one full pass agreed at 12 of 12 (SmolLM2, measured).
The projections around attention (qkv in, o_proj out) keep their QDQ, so an NPU EP still gets quantized MatMuls;
GroupQueryAttention has no QNN kernel, so an NPU EP leaves it, and the KV cache it owns, to the CPU EP anyway.

What is not done, and recorded in the manifest (`not_done`): the static-shape form QNN compiles into a context binary
(fixed prompt length, fixed KV window, split prefill/decode graphs, as Olive produces for onnxruntime-genai on
Snapdragon). Fixing the shapes here would stop onnxruntime-genai from running the model with its dynamic KV cache,
and no QNN SDK is on this host to compile or run it. Ops ONNX Runtime's quantizer does not know (the builder's
GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization) stay float between DQ/Q nodes; an NPU EP
runs what it supports and leaves the rest to the CPU EP.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir

MODEL = "model.onnx"
CALIB_SAMPLES = 16
ACTIVATIONS = "QUInt16"  # measured on SmolLM2 chat-lora: see README (uint8 activations lose the task)
WEIGHTS = "QUInt8"
PER_CHANNEL_MATMUL = True  # MatMul weights: symmetric int8 per output channel (axis 1) instead of one uint8 scale
EXCLUDE = "kv-cache-io"  # stage-key marker: the nodes on the KV cache inputs/outputs stay float (see above)
NOT_DONE = [
    "KV cache not quantized: the nodes reading past_key_values / writing present (GroupQueryAttention, with its "
    "rotary cos/sin caches) stay float; a quantized KV cache needs the static-shape form below and decode-step "
    "calibration",
    "static-shape form for QNN context binaries (fixed prompt length and KV window, split prefill/decode graphs): "
    "not built; onnxruntime-genai runs this model with a dynamic KV cache",
    "not run on an NPU here: accuracy checked on the CPU EP (the same QDQ arithmetic, float kernels between Q/DQ)",
]


class _Reader:
    """CalibrationDataReader: each sample is one full train conversation as a prefill with an empty KV cache."""

    def __init__(self, seqs: list[list[int]], inputs: dict, kv_heads: int, head_size: int):
        self.items = []
        for s in seqs:
            n = len(s)
            feed = {}
            for name, dtype in inputs.items():
                if name == "input_ids":
                    feed[name] = np.asarray([s], dtype=dtype)
                elif name == "attention_mask":
                    feed[name] = np.ones((1, n), dtype=dtype)
                elif name == "position_ids":
                    feed[name] = np.arange(n, dtype=dtype)[None]
                elif name.startswith("past_key_values"):
                    feed[name] = np.zeros((1, kv_heads, 0, head_size), dtype=dtype)
                else:
                    raise ToolchainError(f"npu-qdq: the model input '{name}' is not one calibration knows how to feed")
            self.items.append(feed)
        self._it = iter(self.items)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.items)

    def __len__(self):  # strided calibration (a few samples at a time, less memory) asks for these two
        return len(self.items)

    def set_range(self, start_index: int, end_index: int):
        self._it = iter(self.items[start_index:end_index])


def _inputs(model_file: Path) -> dict:
    import onnx
    from onnx import helper

    m = onnx.load(str(model_file), load_external_data=False)
    return {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in m.graph.input}


def _per_channel_matmul(model_file: Path) -> dict:
    """Tensor overrides: each MatMul weight [in, out] quantized per output channel, symmetric int8 (what QNN's
    HTP takes for per-channel weights)."""
    import onnx
    from onnxruntime.quantization import QuantType

    m = onnx.load(str(model_file), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    return {n.input[1]: [{"axis": 1, "quant_type": QuantType.QInt8, "symmetric": True}]
            for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in inits}


def kv_cache_nodes(model_file: Path, dec: dict) -> tuple[list[str], list[str]]:
    """(names of the nodes that read a past KV graph input or write a present graph output, those KV tensor names),
    from genai_config's input/output names."""
    import onnx

    g = onnx.load(str(model_file), load_external_data=False).graph
    names = [dec["inputs"][k] % i for k in ("past_key_names", "past_value_names") for i in range(dec["num_hidden_layers"])]
    names += [dec["outputs"][k] % i for k in ("present_key_names", "present_value_names")
              for i in range(dec["num_hidden_layers"])]
    kv = set(names)
    nodes = [n.name for n in g.node if kv & set(n.input) or kv & set(n.output)]
    if not nodes or any(not n for n in nodes):
        raise ToolchainError(f"npu-qdq: {model_file}: cannot name the nodes on the KV cache inputs/outputs "
                             f"({len(nodes)} found, some unnamed); the export's graph is not the one expected")
    return nodes, names


def kv_cache_qdq(model_file: Path, kv_names: list[str]) -> int:
    """Q/DQ nodes that read or write a KV cache graph input/output directly (the fix keeps this at 0)."""
    import onnx

    g = onnx.load(str(model_file), load_external_data=False).graph
    kv = set(kv_names)
    return sum(1 for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
               and (kv & set(n.input) or kv & set(n.output)))


def quantize_qdq(export_dir: Path, calib_seqs: list[list[int]], out: Path) -> dict:
    """Write the npu-qdq folder (model + everything else of the export); returns what was done."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

    export_dir = Path(export_dir)
    src = export_dir / MODEL
    if not src.is_file():
        raise ToolchainError(f"{export_dir}: no {MODEL}; pass the folder `toolchain export` wrote")
    if not calib_seqs:
        raise ToolchainError("npu-qdq needs calibration data: the recipe's train split is empty")
    dec = json.loads((export_dir / "genai_config.json").read_text())["model"]["decoder"]
    t0 = time.time()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer warns per tensor through the root logger
    with atomic_dir(Path(out)) as tmp:
        pre = tmp / "preprocessed.onnx"
        model_in = pre if qnn_preprocess_model(str(src), str(pre), save_as_external_data=True,
                                               all_tensors_to_one_file=True,
                                               external_data_location="preprocessed.onnx.data") else src
        reader = _Reader(calib_seqs, _inputs(model_in), dec["num_key_value_heads"], dec["head_size"])
        overrides = _per_channel_matmul(model_in) if PER_CHANNEL_MATMUL else None
        excluded, kv_names = kv_cache_nodes(model_in, dec)
        cfg = get_qnn_qdq_config(str(model_in), reader, activation_type=getattr(QuantType, ACTIVATIONS),
                                 weight_type=getattr(QuantType, WEIGHTS), init_overrides=overrides, stride=4,
                                 nodes_to_exclude=excluded)
        cfg.use_external_data_format = True
        reader.rewind()
        quantize(str(model_in), str(tmp / MODEL), cfg)
        for p in tmp.glob("preprocessed.onnx*"):
            p.unlink()
        for p in export_dir.iterdir():
            if p.is_file() and not p.name.startswith(MODEL) and p.name != "export_report.json":
                shutil.copy2(p, tmp / p.name)
        import onnx

        q = onnx.load(str(tmp / MODEL), load_external_data=False)
        on_kv = kv_cache_qdq(tmp / MODEL, kv_names)
        if on_kv:
            raise ToolchainError(f"npu-qdq: {on_kv} Q/DQ nodes on the KV cache inputs/outputs after excluding "
                                 f"{len(excluded)} nodes; decode would read a mis-calibrated cache")
        ops, kept = Counter(n.op_type for n in q.graph.node), set(excluded)
        dq_out = {o for n in q.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        compute = [n for n in q.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear", "Constant")]
        fed = Counter(n.op_type for n in compute if any(i in dq_out for i in n.input))
        left = Counter(n.op_type for n in compute if not any(i in dq_out for i in n.input))
        report = {"target": "npu-qdq", "activations": ACTIVATIONS.lower(), "weights": WEIGHTS.lower(),
                  "matmul_weights": "int8 symmetric per output channel" if PER_CHANNEL_MATMUL else WEIGHTS.lower(),
                  "calibration": {"method": "MinMax", "samples": len(calib_seqs), "source": "recipe train split",
                                  "tokens": int(sum(len(s) for s in calib_seqs)), "pass": "prefill, empty KV cache"},
                  "preprocessed": model_in == pre, "quantize_linear": ops["QuantizeLinear"],
                  "dequantize_linear": ops["DequantizeLinear"], "ops_with_qdq_inputs": dict(fed),
                  "kept_float": {"nodes": len(excluded),
                                 "op_types": dict(Counter(n.op_type for n in q.graph.node if n.name in kept)),
                                 "why": "they read the KV cache inputs or write the present outputs; the KV cache, "
                                        "rotary caches and attention stay float", "kv_cache_qdq_nodes": on_kv},
                  "ops_without_qdq_inputs": dict(left), "not_done": NOT_DONE,
                  "seconds": round(time.time() - t0, 1),
                  "size_mb": round(sum(p.stat().st_size for p in tmp.glob(MODEL + "*")) / 1e6, 1)}
        (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2))
    return report


def calibration_seqs(merged_dir: Path, recipe, recipe_file: Path, n: int = CALIB_SAMPLES) -> list[list[int]]:
    """Token ids of the first n train conversations (chat template applied), the model's own tokenizer."""
    from toolchain.hf import data as data_mod
    from toolchain.hf.models import load_tokenizer

    ds = data_mod.load(recipe, recipe_file, load_tokenizer(merged_dir))
    return [ex["input_ids"] for ex in ds.train[:n]]
