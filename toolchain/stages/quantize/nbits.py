"""Stage 4: quantize an exported fp32 ONNX folder for a target, with onnxruntime.quantization.

    cpu-fp32   the reference, copied as is
    cpu-int4   MatMulNBits weight-only int4 (block 32, accuracy level 4 = int8 activations on CPU, lm_head too);
               algorithm RTN by default, HQQ or k-quant from the recipe's `quantize:` section; the embedding
               table fp32 or int4 (GatherBlockQuantized); chosen projections and edge layers in 8-bit (mixed);
               optionally the lm_head on the last position only (prune_lm_head: faster prefill)
    cpu-int8   MatMulNBits weight-only int8 (block 32, asymmetric, accuracy level 4, lm_head too). Dynamic int8
               (MatMulInteger, per-tensor activations) decoded SmolLM2 24% faster and prefilled 2x faster, but its
               held-out mean KL to fp32 was 0.58 (worse than int4's 0.36) against 0.005 for this
               (bench/results/decode-*.json)

Everything else in the folder (genai_config.json, tokenizer, chat template) is copied beside the new model.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir
from toolchain.config.schema import QuantizeSpec
from toolchain.config.targets import TARGETS

BUILDS = {n: {"provider": t["provider"], "precision": t["precision"]} for n, t in TARGETS.items()
          if t["built_by"] == "quantize"}  # the targets this module builds
MODEL = "model.onnx"
INT8 = QuantizeSpec(block_size=32, symmetric=False, accuracy_level=4, lm_head_bits=8)  # cpu-int8: fixed, not the recipe's
# Accuracy level 4 (int8 activations) holds on CPUs without VNNI, unlike the encoders' full-range dynamic int8
# (dynamic.py): a random 2-layer Phi-3 (hidden 256, intermediate 768), one 12-token prefill, ORT 1.32, native
# (AVX512-VNNI) vs `qemu-x86_64 -cpu Haswell` (AVX2): max |logit diff| 7e-7 for cpu-int4, 5e-7 for cpu-int8, same
# argmax everywhere.


# the builder's projection names, by the names a recipe's `quantize.int8` list uses
PROJECTIONS = {"qkv_proj": ("qkv_proj", "q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
               "gate_proj": ("gate_proj", "gate_up_proj"), "up_proj": ("up_proj", "gate_up_proj"),
               "down_proj": ("down_proj",)}


def bits_for(name: str, spec: QuantizeSpec, n_layers: int, bits: int = 4) -> int:
    """One MatMul node's width: `bits`, 8, or 0 (left fp32), from the spec's lm_head, int8 and int8_edge_layers keys
    (edge layers past the middle overlap: then every layer is 8-bit)."""
    if "lm_head" in name:
        return spec.lm_head_bits if spec.lm_head else 0
    m = re.search(r"/layers\.(\d+)/", name)
    if m and (int(m.group(1)) < spec.int8_edge_layers or int(m.group(1)) >= n_layers - spec.int8_edge_layers):
        return 8
    parts = name.split("/")
    return 8 if any(p in parts for key in spec.int8 for p in PROJECTIONS[key]) else bits


def bit_widths(names: list[str], spec: QuantizeSpec, bits: int = 4) -> dict[str, int]:
    """MatMul node name -> its width (bits_for), for a whole graph."""
    layers = [int(m.group(1)) for n in names if (m := re.search(r"/layers\.(\d+)/", n))]
    n_layers = max(layers, default=-1) + 1
    out = {n: bits_for(n, spec, n_layers, bits) for n in names}
    for key in spec.int8:
        if not any(p in n.split("/") for n in names for p in PROJECTIONS[key]):
            raise ToolchainError(f"quantize.int8: no '{key}' projection in this model's graph; its MatMul nodes are "
                                 f"named like {sorted(names)[:3]}; remove '{key}' from the list")
    return out


def _nbits(src: Path, dst: Path, spec: QuantizeSpec, bits: int = 4) -> dict:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    algo = {"rtn": None,
            "hqq": lambda: mnb.HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=4),
            "k_quant": lambda: mnb.KQuantWeightOnlyQuantConfig()}[spec.algo]
    model = onnx.load(str(src))
    if spec.prune_lm_head:
        _prune_lm_head(model)
    fed = {i.name for i in model.graph.input}  # a weight fed at run time (a LoRA adapter's) stays float
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    widths = bit_widths([n.name for n in matmuls if n.input[1] not in fed], spec, bits)
    widths.update({n.name: 0 for n in matmuls if n.input[1] in fed})
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    for width in (4, 8):  # one pass per width; nodes_to_include only adds to the op types, exclusion restricts
        if width in widths.values():
            q = mnb.MatMulNBitsQuantizer(model, bits=width, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                         accuracy_level=spec.accuracy_level,
                                         nodes_to_exclude=[n for n, b in widths.items() if b != width],
                                         algo_config=algo() if algo and width == 4 else None)
            q.process()
            model = q.model.model
    if spec.embedding == "int4":  # ORT's quantizer writes GatherBlockQuantized in 4-bit only
        _embedding_as_constant(model)
        q = mnb.MatMulNBitsQuantizer(model, bits=4, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                     op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),),
                                     nodes_to_include=[n.name for n in model.graph.node if n.op_type == "Gather"
                                                       and "embed_tokens" in n.name])
        q.process()
        model = q.model.model
        used = {i for n in model.graph.node for i in n.input}
        for init in [i for i in model.graph.initializer if i.name not in used]:  # the fp32 tables now unused
            model.graph.initializer.remove(init)
    onnx.save(model, str(dst), save_as_external_data=True, location=MODEL + ".data")
    nodes = [n.op_type for n in model.graph.node]
    return {"matmulnbits": nodes.count("MatMulNBits"), "matmul_left_fp32": nodes.count("MatMul"),
            "int8_matmuls": sum(b == 8 for b in widths.values()),
            "gather_block_quantized": nodes.count("GatherBlockQuantized"),
            "lm_head_quantized": spec.lm_head and any("lm_head" in n for n in widths),
            "logits": "last position only" if spec.prune_lm_head else "every position", **spec.model_dump()}


def _prune_lm_head(model) -> None:
    """Feed the lm_head the last position's hidden state only (Gather -1 on the sequence axis, Unsqueeze), as the
    builder's prune_lm_head option does at export; here at the quantize stage, so the fp32 export keeps every
    position's logits for its parity check and the fp32 reference. `logits` is declared [batch, 1, vocab]: that
    static 1 is what tells onnxruntime-genai (Model::IsPruned) to expect one position from a prompt."""
    from onnx import helper, numpy_helper

    g = model.graph
    head = next((n for n in g.node if n.op_type == "MatMul" and "lm_head" in n.name and "logits" in n.output), None)
    out = next((o for o in g.output if o.name == "logits"), None)
    if head is None or out is None:
        raise ToolchainError("quantize.prune_lm_head: this graph has no lm_head MatMul writing `logits` (the "
                             "onnxruntime-genai builder's layout); set prune_lm_head: false")
    g.initializer.extend([numpy_helper.from_array(np.array(-1, np.int64), "/lm_head/prune/last"),
                          numpy_helper.from_array(np.array([1], np.int64), "/lm_head/prune/axes")])
    x = head.input[0]
    at = list(g.node).index(head)
    g.node.insert(at, helper.make_node("Gather", [x, "/lm_head/prune/last"], ["/lm_head/prune/Gather/output_0"],
                                       name="/lm_head/prune/Gather", axis=1))
    g.node.insert(at + 1, helper.make_node("Unsqueeze", ["/lm_head/prune/Gather/output_0", "/lm_head/prune/axes"],
                                           ["/lm_head/prune/Unsqueeze/output_0"], name="/lm_head/prune/Unsqueeze"))
    head.input[0] = "/lm_head/prune/Unsqueeze/output_0"
    seq = out.type.tensor_type.shape.dim[1]
    seq.Clear()
    seq.dim_value = 1


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


def spec_for(target: str, spec: QuantizeSpec | None) -> QuantizeSpec:
    """The settings `target` is built with (and keyed by in the stage cache): cpu-int8's are fixed, cpu-int4 takes
    the recipe's."""
    return INT8 if target == "cpu-int8" else spec or QuantizeSpec()


def quantize(onnx_dir: Path, target: str, out: Path, spec: QuantizeSpec | None = None) -> dict:
    """Write the quantized model folder for `target`; returns what was done (also in quantize_report.json)."""
    onnx_dir, spec = Path(onnx_dir), spec_for(target, spec)
    if target not in BUILDS:
        other = f" ('{target}' is built by `toolchain edge --target {target}`)" if target in TARGETS else ""
        raise ToolchainError(f"`toolchain quantize` builds {', '.join(BUILDS)}{other}; `toolchain targets` lists all")
    if not (onnx_dir / MODEL).is_file():
        raise ToolchainError(f"{onnx_dir}: no {MODEL}; pass the folder `toolchain export` wrote")
    t0 = time.time()
    with atomic_dir(Path(out)) as tmp:
        for p in onnx_dir.iterdir():
            if p.is_file() and (target == "cpu-fp32" or not p.name.startswith(MODEL)) and p.name != "export_report.json":
                shutil.copy2(p, tmp / p.name)
        info = {"cpu-fp32": lambda: {}, "cpu-int4": lambda: _nbits(onnx_dir / MODEL, tmp / MODEL, spec),
                "cpu-int8": lambda: _nbits(onnx_dir / MODEL, tmp / MODEL, spec, bits=8)}[target]()
        report = {"target": target, **BUILDS[target], **info, "seconds": round(time.time() - t0, 1),
                  "size_mb": round(sum(p.stat().st_size for p in tmp.glob(MODEL + "*")) / 1e6, 1)}
        (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2))
    return report
