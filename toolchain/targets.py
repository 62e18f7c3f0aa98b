"""Every ONNX Runtime target the toolchain builds: execution provider, its options, precision, and who builds it.

    built_by "quantize"  onnxruntime.quantization on the fp32 export (weight-only int4, dynamic int8, fp32 copy)
    built_by "builder"   onnxruntime_genai.models.builder from the merged HF folder, for that EP and precision
    built_by "qdq"       static QDQ quantization (onnxruntime.quantization, QNN config helpers) with calibration
                         data from the recipe's train split; the model is checked on the CPU EP where no NPU is

`provider` is onnxruntime-genai's name for the EP (what genai_config.json's provider_options use), `ep` is ONNX
Runtime's. No torch here: `toolchain targets` and validation on a device import this module.
"""
from __future__ import annotations

from typing import Optional

from .errors import ToolchainError

# QNN: HTP (the Hexagon NPU) backend. VitisAI and OpenVINO read the same QDQ graph; their options are listed in the
# manifest for the user, genai_config.json names QNN (one EP per session).
QNN_OPTIONS = {"backend_type": "htp"}
QDQ_ALSO = [{"provider": "VitisAI", "ep": "VitisAIExecutionProvider", "provider_options": {}},
            {"provider": "OpenVINO", "ep": "OpenVINOExecutionProvider", "provider_options": {"device_type": "NPU"}}]

TARGETS: dict[str, dict] = {
    "cpu-fp32": {"provider": "cpu", "ep": "CPUExecutionProvider", "precision": "fp32", "built_by": "quantize"},
    # session_options: written into genai_config.json when packaged, where a device owner can change them. Intra-op
    # threads spin while waiting (ONNX Runtime's default, and llama.cpp's): on the idle 2-core CPU, 2 threads decode
    # SmolLM2 at 242 tok/s spinning against 145 not (bench/results/decode-*.json). On a CPU shared with other work
    # set it to "0": there the spinning thread loses its time slices (41 vs 78 tok/s at load 3, decode-tune-*.json).
    "cpu-int4": {"provider": "cpu", "ep": "CPUExecutionProvider", "precision": "int4", "built_by": "quantize",
                 "session_options": {"session.intra_op.allow_spinning": "1"}},
    "cpu-int8": {"provider": "cpu", "ep": "CPUExecutionProvider", "precision": "int8", "built_by": "quantize"},
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
}
# onnxruntime-genai's own build flags, where it has one (the EP must be in both ORT and onnxruntime-genai)
_OG_CHECK = {"cuda": "is_cuda_available", "dml": "is_dml_available", "webgpu": "is_webgpu_available"}


def get(name: str) -> dict:
    if name not in TARGETS:
        raise ToolchainError(f"unknown target '{name}'. Targets: {', '.join(TARGETS)} (or 'auto' with `toolchain edge`); "
                             "`toolchain targets` lists them")
    return {"name": name, "provider_options": {}, **TARGETS[name]}


def ep_available(ep: str, provider: Optional[str] = None) -> bool:
    """True when this host's ONNX Runtime (and onnxruntime-genai, where it says) can run the EP."""
    import onnxruntime as ort

    if ep not in ort.get_available_providers():
        return False
    check = _OG_CHECK.get(provider or "")
    if check:
        import onnxruntime_genai as og

        return bool(getattr(og, check, lambda: True)())
    return True


def host_can_validate(name: str) -> tuple[bool, str]:
    """(can validate here, on which EP or why not)."""
    t = get(name)
    if ep_available(t["ep"], t["provider"]):
        return True, t["ep"]
    if t.get("cpu_reference"):
        return True, f"CPUExecutionProvider ({t['ep']} unavailable)"
    return False, f"{t['ep']} unavailable"


def listing() -> list[dict]:
    rows = []
    for name in TARGETS:
        t = get(name)
        ok, how = host_can_validate(name)
        here = ("yes" if how == t["ep"] else f"accuracy, on {how}") if ok else f"no ({how})"
        rows.append({"target": name, "ep": t["ep"], "precision": t["precision"], "built_by": t["built_by"],
                     "provider_options": t["provider_options"], "validate_here": here,
                     "gates": {**t.get("gates", {})}})
    return rows


def stamp_genai_config(folder, target: dict) -> None:
    """genai_config.json names the target's EP with its provider options (where the builder has not already) and,
    in the session log_id, the target and precision: onnxruntime-genai rejects unknown keys, log_id is free text."""
    import json
    from pathlib import Path

    path = Path(folder) / "genai_config.json"
    cfg = json.loads(path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    so["log_id"] = f"onnxruntime-genai {target['name']} {target['precision']} {target['ep']}"
    # the target's own session defaults; a string value that is not an onnxruntime-genai option is passed to ONNX
    # Runtime as a session config entry (e.g. session.intra_op.allow_spinning)
    so.update(target.get("session_options") or {})
    named = [p for entry in so.get("provider_options", []) for p in entry]
    if target["provider"] != "cpu" and target["provider"] not in named:
        so["provider_options"] = [{target["provider"]: {k: str(v) for k, v in target.get("provider_options", {}).items()}}]
    path.write_text(json.dumps(cfg, indent=4) + "\n")
