"""Stage 4: quantize an exported fp32 ONNX folder for a target, with onnxruntime.quantization.

    cpu-fp32   the reference, copied as is
    cpu-int4   MatMulNBits weight-only int4 (block 32, accuracy level 4 = int8 activations on CPU, lm_head too);
               algorithm RTN by default, HQQ or k-quant from the recipe's `quantize:` section; the embedding
               table fp32 or int4 (GatherBlockQuantized)
    cpu-int8   dynamic int8 (weights int8 per channel, activations quantized at run time)

Everything else in the folder (genai_config.json, tokenizer, chat template) is copied beside the new model.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from .errors import ToolchainError
from .fsutil import atomic_dir
from .schema import QuantizeSpec
from .targets import TARGETS as ALL_TARGETS

TARGETS = {n: {"provider": t["provider"], "precision": t["precision"]} for n, t in ALL_TARGETS.items()
           if t["built_by"] == "quantize"}
MODEL = "model.onnx"


def _int4(src: Path, dst: Path, spec: QuantizeSpec) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    algo = {"rtn": None,
            "hqq": lambda: mnb.HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=4),
            "k_quant": lambda: mnb.KQuantWeightOnlyQuantConfig()}[spec.algo]
    model = onnx.load(str(src))
    head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    q = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                 accuracy_level=spec.accuracy_level,
                                 nodes_to_exclude=[] if spec.lm_head and spec.lm_head_bits == 4 else head,
                                 algo_config=algo() if algo else None)
    q.process()
    model = q.model.model
    if spec.lm_head and spec.lm_head_bits == 8 and head:  # the output projection alone, in 8-bit MatMulNBits
        q = mnb.MatMulNBitsQuantizer(model, bits=8, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                     accuracy_level=spec.accuracy_level, nodes_to_include=head)
        q.process()
    if spec.embedding == "int4":
        model = q.model.model
        _embedding_as_constant(model)
        q = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                     op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),
                                     nodes_to_include=[n.name for n in model.graph.node if n.op_type == "Gather"
                                                       and "embed_tokens" in n.name])
        q.process()
        graph = q.model.model.graph
        used = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer if i.name not in used]:  # the fp32 tables now unused
            graph.initializer.remove(init)
    q.model.save_model_to_file(str(dst), use_external_data_format=True)
    nodes = [n.op_type for n in q.model.model.graph.node]
    return {"matmulnbits": nodes.count("MatMulNBits"), "matmul_left_fp32": nodes.count("MatMul"),
            "gather_block_quantized": nodes.count("GatherBlockQuantized"),
            "lm_head_quantized": spec.lm_head and bool(head), **spec.model_dump()}


def _embedding_as_constant(model) -> None:
    """The builder ties the embedding to lm_head: Gather reads Transpose(lm_head weight), which ONNX Runtime folds
    into a second fp32 copy at load. Fold it here into an initializer of its own, so the Gather quantizer (which
    only takes constant tables) can turn it into GatherBlockQuantized."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type != "Gather" or "embed_tokens" not in node.name or node.input[0] in inits:
            continue
        tr = next((n for n in model.graph.node if node.input[0] in n.output and n.op_type == "Transpose"), None)
        if tr is None or tr.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        table = numpy_helper.to_array(inits[tr.input[0]], base_dir="").transpose(perm)
        model.graph.initializer.append(numpy_helper.from_array(table.copy(), "model.embed_tokens.weight"))
        node.input[0] = "model.embed_tokens.weight"
        if not any(tr.output[0] in n.input for n in model.graph.node):
            model.graph.node.remove(tr)


def _int8(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    return {"weight_type": "int8", "per_channel": True}


def quantize(onnx_dir: Path, target: str, out: Path, spec: QuantizeSpec | None = None) -> dict:
    """Write the quantized model folder for `target`; returns what was done (also in quantize_report.json)."""
    onnx_dir, spec = Path(onnx_dir), spec or QuantizeSpec()
    if target not in TARGETS:
        other = f" ('{target}' is built by `toolchain edge --target {target}`)" if target in ALL_TARGETS else ""
        raise ToolchainError(f"`toolchain quantize` builds {', '.join(TARGETS)}{other}; `toolchain targets` lists all")
    if not (onnx_dir / MODEL).is_file():
        raise ToolchainError(f"{onnx_dir}: no {MODEL}; pass the folder `toolchain export` wrote")
    t0 = time.time()
    with atomic_dir(Path(out)) as tmp:
        for p in onnx_dir.iterdir():
            if p.is_file() and (target == "cpu-fp32" or not p.name.startswith(MODEL)) and p.name != "export_report.json":
                shutil.copy2(p, tmp / p.name)
        info = {"cpu-fp32": lambda: {}, "cpu-int4": lambda: _int4(onnx_dir / MODEL, tmp / MODEL, spec),
                "cpu-int8": lambda: _int8(onnx_dir / MODEL, tmp / MODEL)}[target]()
        report = {"target": target, **TARGETS[target], **info, "seconds": round(time.time() - t0, 1),
                  "size_mb": round(sum(p.stat().st_size for p in tmp.glob(MODEL + "*")) / 1e6, 1)}
        (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2))
    return report
