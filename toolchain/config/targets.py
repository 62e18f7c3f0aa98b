"""Every ONNX Runtime target the toolchain builds: execution provider, its options, precision, and who builds it.

    built_by "quantize"  onnxruntime.quantization on the fp32 export (weight-only int4, dynamic int8, fp32 copy)
    built_by "builder"   onnxruntime_genai.models.builder from the merged HF folder, for that EP and precision
    built_by "qdq"       static QDQ quantization (onnxruntime.quantization, QNN config helpers) with calibration
                         data from the recipe's train split; the model is checked on the CPU EP where no NPU is
    built_by "llama.cpp" a GGUF for llama.cpp from the merged HF folder, by llama.cpp's converter (and quantizer);
                         opt-in (never an --target auto candidate), validated with llama-cpp-python where installed

This is the one table of targets (the GGUF ones run on llama.cpp, not ONNX Runtime: their `ep` and `provider` name it). A target that encoders (classify-encoder, ner) build too says how in `encoder`:
for them cpu-int8 is dynamic int8 (quantize_dynamic, int8 activations at run time), not the decoders' weight-only
MatMulNBits; `get(name, kind="encoder")` gives that view.

`provider` is onnxruntime-genai's name for the EP (what genai_config.json's provider_options use), `ep` is ONNX
Runtime's. No torch here: `toolchain targets` and validation on a device import this module.
"""
from __future__ import annotations

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.providers import ep_available

# QNN: HTP (the Hexagon NPU) backend. VitisAI and OpenVINO read the same QDQ graph; their options are listed in the
# manifest for the user, genai_config.json names QNN (one EP per session).
QNN_OPTIONS = {"backend_type": "htp"}
QDQ_ALSO = [{"provider": "VitisAI", "ep": "VitisAIExecutionProvider", "provider_options": {}},
            {"provider": "OpenVINO", "ep": "OpenVINOExecutionProvider", "provider_options": {"device_type": "NPU"}}]

TARGETS: dict[str, dict] = {
    "cpu-fp32": {"provider": "cpu", "ep": "CPUExecutionProvider", "precision": "fp32", "built_by": "quantize",
                 "encoder": {"built_by": "copy"}},
    # session_options: written into genai_config.json when packaged, where a device owner can change them. Intra-op
    # threads spin while waiting (ONNX Runtime's default, and llama.cpp's): on the idle 2-core CPU, 2 threads decode
    # SmolLM2 at 242 tok/s spinning against 145 not (bench/results/decode-*.json). On a CPU shared with other work
    # set it to "0": there the spinning thread loses its time slices (41 vs 78 tok/s at load 3, decode-tune-*.json).
    "cpu-int4": {"provider": "cpu", "ep": "CPUExecutionProvider", "precision": "int4", "built_by": "quantize",
                 "session_options": {"session.intra_op.allow_spinning": "1"}},
    "cpu-int8": {"provider": "cpu", "ep": "CPUExecutionProvider", "precision": "int8", "built_by": "quantize",
                 "method": "weight-only 8-bit MatMulNBits",
                 "encoder": {"built_by": "dynamic", "method": "quantize_dynamic (int8 weights and activations)"}},
    "cuda-fp16": {"provider": "cuda", "ep": "CUDAExecutionProvider", "precision": "fp16", "built_by": "builder"},
    "cuda-int4": {"provider": "cuda", "ep": "CUDAExecutionProvider", "precision": "int4", "built_by": "builder"},
    "dml-int4": {"provider": "dml", "ep": "DmlExecutionProvider", "precision": "int4", "built_by": "builder"},
    "webgpu-int4": {"provider": "webgpu", "ep": "WebGpuExecutionProvider", "precision": "int4", "built_by": "builder"},
    "npu-qdq": {"provider": "qnn", "ep": "QNNExecutionProvider", "precision": "qdq-a16w8", "built_by": "qdq",
                "provider_options": QNN_OPTIONS, "also_runs_on": QDQ_ALSO,
                # a QDQ graph is standard ONNX: its accuracy is checked on the CPU EP where the NPU is absent
                "cpu_reference": True,
                # its budget, on top of the recipe's accuracy gates (min_decode_tok_s is not applied on the CPU EP):
                # greedy decoding through the KV cache must track the fp32 model. Prefill-only figures (perplexity)
                # missed a broken decode path once (perplexity +0.2 %, token agreement 0.03); the CPU int4 default
                # agrees at 0.911 on chat-lora, and A16W8 must do at least as well as that bar
                "gates": {"min_token_agreement_fp32": 0.9}},
    # the same fine-tune for llama.cpp users (stages/quantize/gguf.py). q8_0: the converter's own Q8_0 (no compiled
    # llama.cpp needed to build it); q4_k_m: llama.cpp's quantizer, which needs llama-cpp-python on the build host
    "gguf-q8_0": {"provider": "llama.cpp", "ep": "llama.cpp", "precision": "q8_0", "built_by": "llama.cpp",
                  "method": "GGUF Q8_0 (llama.cpp convert_hf_to_gguf.py --outtype q8_0)"},
    "gguf-q4_k_m": {"provider": "llama.cpp", "ep": "llama.cpp", "precision": "q4_k_m", "built_by": "llama.cpp",
                    "method": "GGUF Q4_K_M (llama.cpp's llama_model_quantize from an f32 GGUF)"},
}


def get(name: str, kind: str = "decoder") -> dict:
    """The target as a `kind` model builds it (an encoder's view replaces built_by and method)."""
    if name not in TARGETS:
        raise ToolchainError(f"unknown target '{name}'. Targets: {', '.join(TARGETS)} (or 'auto' with `toolchain edge`); "
                             "`toolchain targets` lists them")
    t = {"name": name, "provider_options": {}, **TARGETS[name]}
    enc = t.pop("encoder", None)
    if kind == "encoder":
        if enc is None:
            built = [n for n, x in TARGETS.items() if "encoder" in x]
            raise ToolchainError(f"target '{name}' is not built for encoders; use {' or '.join(reversed(built))} "
                                 f"(pass --target cpu-int8, or set `target:` in the recipe)")
        t.pop("method", None)
        t.update(enc)
    return t


def host_can_validate(name: str) -> tuple[bool, str]:
    """(can validate here, on which EP or why not)."""
    t = get(name)
    if t["built_by"] == "llama.cpp":
        from toolchain.runtime.llamacpp import llama_cpp_version

        return (True, t["ep"]) if llama_cpp_version() else (False, "llama-cpp-python not installed")
    if ep_available(t["ep"], t["provider"]):
        return True, t["ep"]
    if t.get("cpu_reference"):
        return True, f"CPUExecutionProvider ({t['ep']} unavailable)"
    return False, f"{t['ep']} unavailable"


def listing() -> list[dict]:
    """One row per target; validate_here: whether this host can validate it, validate_on: on which EP (a QDQ
    target's accuracy on the CPU EP where its own is missing), why: the reason when not, or not on its own EP."""
    rows = []
    for name in TARGETS:
        t = get(name)
        ok, how = host_can_validate(name)
        rows.append({"target": name, "ep": t["ep"], "precision": t["precision"], "built_by": t["built_by"],
                     "provider_options": t["provider_options"], "validate_here": ok,
                     "validate_on": ("CPUExecutionProvider" if how != t["ep"] else t["ep"]) if ok else None,
                     "why": None if how == t["ep"] else (f"{t['ep']} unavailable: accuracy only" if ok else how),
                     "gates": {**t.get("gates", {})}})
    return rows
