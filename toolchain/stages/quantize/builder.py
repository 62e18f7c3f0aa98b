"""Builder targets: cuda-fp16, cuda-int4, dml-int4, webgpu-int4, built by onnxruntime-genai's model builder from the
merged HF folder for that execution provider and precision.

The builder writes genai_config.json with the EP's provider_options (packaging adds target and precision to its
log_id).
Int4 is the builder's symmetric RTN, block 32, in MatMulNBits (with a tied embedding, GatherBlockQuantized shares
the lm_head's int4 weight). These models are built on any host; only a host with the EP runs them.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir
from toolchain.config.targets import get

MODEL = "model.onnx"
# Measured on SmolLM2 (tied embedding), builder int4 for the CPU EP, onnxruntime-genai 0.15.2: is_symmetric=true loads
# and generates; is_symmetric=false fails to load ("Type (tensor(uint8)) of output arg (/model/embed_tokens/Reshape/
# output_0) ... does not match expected type (tensor(float))"). So symmetric is kept explicit for every builder int4.
BUILDER_OPTIONS = {"int4": ("is_symmetric=true", "block_size=32"), "fp16": ()}


def build(merged_dir: Path, target: str, out: Path, trust_remote_code: bool = False) -> dict:
    """Build `target` from the HF folder into `out` (atomically); returns what was built (also build_report.json)."""
    from toolchain.stages.export.decoder import builder_clash_reason, check_source, export_genai

    t = get(target)
    if t["built_by"] != "builder":
        raise ToolchainError(f"target '{target}' is not built by the onnxruntime-genai builder (built_by "
                             f"'{t['built_by']}')")
    merged_dir = Path(merged_dir)
    check_source(merged_dir)
    clash = builder_clash_reason(merged_dir, trust_remote_code)
    if clash:  # no parity check here to catch it, and no other exporter builds these targets
        raise ToolchainError(f"{target} is built by the onnxruntime-genai model builder, and {clash} "
                             "(docs/phi3-builder-avx2.md); build a cpu-* target, exported by optimum for this model")
    t0 = time.time()
    options = BUILDER_OPTIONS[t["precision"]]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    with atomic_dir(Path(out)) as tmp, tempfile.TemporaryDirectory(prefix="toolchain-build-") as work:
        export_genai(merged_dir, tmp, t["precision"], Path(work), trust_remote_code, t["provider"], options)
        so = json.loads((tmp / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
        named = [p for entry in so.get("provider_options", []) for p in entry]
        if t["provider"] not in named:
            raise ToolchainError(f"the builder's genai_config.json for {target} names {named or 'no EP'}, "
                                 f"not {t['provider']}; report this with the onnxruntime-genai version")
        import onnx

        graph = onnx.load(str(tmp / MODEL), load_external_data=False).graph
        ops = Counter(n.op_type for n in graph.node)
        io = {i.name: onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in graph.output if i.name == "logits"}
        report = {"target": target, "builder_options": list(options), "genai_provider_options": so["provider_options"],
                  "ops": {k: ops[k] for k in ("MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention", "MatMul") if ops[k]},
                  "logits_dtype": io.get("logits"), "seconds": round(time.time() - t0, 1),
                  "size_mb": round(sum(p.stat().st_size for p in tmp.glob(MODEL + "*")) / 1e6, 1)}
        (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2))
    return report
