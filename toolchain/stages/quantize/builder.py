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
from contextlib import contextmanager
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


def build_large_int4(merged_dir: Path, out: Path, spec, trust_remote_code: bool = False) -> dict:
    """cpu-int4 for a model whose fp32 ONNX copy would not fit (hf.models.LARGE_MODEL_BYTES): the builder, with the
    HF model loaded in its own dtype and each weight quantized to MatMulNBits as the builder reaches it (onnxruntime's
    MLAS block quantizer, the recipe's block size, symmetry and accuracy level). The builder alone keeps the whole
    model as a float ONNX graph in memory and quantizes it at the end: for Phi-3-mini, 15 GB of fp32 on top of the
    torch weights."""
    from toolchain.hf.models import config_dtype
    from toolchain.stages.export.decoder import builder_clash_reason, check_source, export_genai

    merged_dir = Path(merged_dir)
    check_source(merged_dir)
    clash = builder_clash_reason(merged_dir, trust_remote_code)
    if clash:
        raise ToolchainError(f"this model is too large for an fp32 ONNX export here, and the onnxruntime-genai "
                             f"builder that would build it directly in int4 gets it wrong: {clash} "
                             "(docs/phi3-builder-avx2.md)")
    if spec.algo != "rtn" or spec.prune_lm_head:
        raise ToolchainError("recipe key 'quantize': a model this large is quantized as the builder builds it, with "
                             "RTN only (algo: rtn; prune_lm_head: false)")
    t0 = time.time()
    options = ("is_symmetric=" + str(spec.symmetric).lower(), f"block_size={spec.block_size}",
               f"accuracy_level={spec.accuracy_level}")
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    with atomic_dir(Path(out)) as tmp, tempfile.TemporaryDirectory(prefix="toolchain-build-") as work, \
            _loaded_in(config_dtype(merged_dir)), _quantized_as_built(spec) as counted:
        export_genai(merged_dir, tmp, "int4", Path(work), trust_remote_code, "cpu", options)
        report = {"target": "cpu-int4", "built_by": "onnxruntime-genai builder, int4 as built",
                  "builder_options": list(options), "quantized_as_built": counted["matmuls"],
                  "int8_matmuls": counted["int8"], "int8": list(spec.int8), "int8_edge_layers": spec.int8_edge_layers,
                  "lm_head_bits": spec.lm_head_bits,
                  "algo": "rtn", "block_size": spec.block_size, "symmetric": spec.symmetric,
                  "accuracy_level": spec.accuracy_level, "lm_head": spec.lm_head, "embedding": "fp32",
                  "seconds": round(time.time() - t0, 1),
                  "size_mb": round(sum(p.stat().st_size for p in tmp.glob(MODEL + "*")) / 1e6, 1)}
        (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2))
    return report


@contextmanager
def _loaded_in(dtype):
    """The builder loads the HF model with transformers' default (fp32); here, in `dtype`."""
    from unittest import mock

    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained

    def in_dtype(*args, **kwargs):
        kwargs.setdefault("dtype", dtype)
        return load(*args, **kwargs)

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", in_dtype):
        yield


@contextmanager
def _quantized_as_built(spec):
    """Hand the builder's MatMulNBits maker a pre-quantized weight (its AWQ/GPTQ path) for every float Linear."""
    from types import SimpleNamespace
    from unittest import mock

    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer
    import onnxruntime_genai.models.builder  # noqa: F401  (it puts its folder on sys.path and imports `builders`)
    from builders.base import Model  # the module the builder's model classes subclass

    from toolchain.stages.quantize.nbits import bits_for

    q = {b: DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
        block_size=spec.block_size, is_symmetric=spec.symmetric, accuracy_level=spec.accuracy_level, bits=b))
        for b in (4, 8)}
    make = Model.make_matmul_nbits
    counted = {"matmuls": 0, "int8": 0}

    def as_built(self, matmul, basename, root_input, **kwargs):
        w = getattr(matmul, "weight", None)
        bits = bits_for("/lm_head/MatMul" if kwargs.get("logits") else basename, spec, self.num_layers)
        if hasattr(matmul, "qweight") or w is None or w.dim() != 2 or not bits:
            return make(self, matmul, basename, root_input, **kwargs)
        n, k = w.shape
        packed, scales, zp = q[bits].qbits_block_quant(w.detach().to(torch.float32).T.contiguous().numpy())
        pre = SimpleNamespace(qweight=torch.from_numpy(packed), scales=torch.from_numpy(scales), bits=bits,
                              group_size=spec.block_size, in_features=k, out_features=n)
        if not spec.symmetric:
            pre.qzeros = torch.from_numpy(zp)
        counted["matmuls"] += 1
        counted["int8"] += bits == 8
        return make(self, pre, basename, root_input, **kwargs)

    with mock.patch.object(Model, "make_matmul_nbits", as_built):
        yield counted
