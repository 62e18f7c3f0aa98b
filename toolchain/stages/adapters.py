"""Multi-adapter artifacts, the build-host side: one base exported once with LoRA inputs, and each recipe's PEFT
adapter converted to ONNX Runtime's adapter format (.onnx_adapter, onnxruntime.AdapterFormat) for it.

    base      onnxruntime-genai's model builder (0.15.2) with its `adapter_path` extra option builds the base with a
              LoRA path beside every targeted projection: MatMul(x, A) -> MatMul(., B) -> Add to the base MatMul,
              with q/k/v and gate/up unpacked (the builder does not pack LoRA projections) and B scaled by the
              adapter's alpha/r. It bakes A and B in as initializers, and at int4 it quantizes them into the graph
              too (MatMulNBits of a fixed rank), so it gives no swappable model by itself. Here the builder runs at
              fp32 on a template adapter (rank 1, the target modules, nothing trained), and every A and B becomes a
              graph input with a dynamic rank `lora_r` and an empty default (rank 0: the LoRA path adds zeros), as
              Olive's ExtractAdapters pass does. The base alone runs as the plain base (checked against torch), and
              the quantize stage (quantize/nbits.py) leaves MatMuls fed at run time in float. For a builder
              target (CUDA, WebGPU) the builder runs at the target's precision with the LoRA MatMuls in
              int4_nodes_to_exclude, so the LoRA path stays in the model's fp16 (build_base_for).
    convert   the recipe's PEFT weights mapped onto the base's LoRA inputs in the builder's layout (A as [in, r],
              B scaled and as [r, out], packed projections split), written as fp32 or fp16 (the base's LoRA inputs
              are one or the other: an fp16 input is cast to fp32 in the graph), and checked: the ONNX base with
              the adapter against torch's base with the PEFT adapter.

onnxruntime-genai runs them with og.Adapters(model).load(file, name) and generator.set_active_adapter(adapters,
name) (runtime/genai.py `Adapted`); the artifact layout and its checks are runtime/adapters.py's.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from toolchain.config.schema import Recipe
from toolchain.config.sources import Resolved
from toolchain.runtime import adapters as rt
from toolchain.runtime.contracts import Manifest
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir, sha256_file
from toolchain.runtime.genai import ADAPTER_SUFFIX, ADAPTERS_DIR
from toolchain.runtime.retention import RETENTION_FILE

MODEL = "model.onnx"
METHODS = ("lora", "rslora")  # plain LoRA weights: what the builder's LoRA path computes
DTYPES = {"fp32": np.float32, "fp16": np.float16}
RANK = "lora_r"
ADAPTER_FILE = "adapter" + ADAPTER_SUFFIX  # inside a convert stage's folder


def check_recipe(rec: Recipe) -> None:
    """Refuse, before any training, a recipe whose adapter cannot run on a shared base."""
    if rec.task == "ner":
        raise ToolchainError(f"recipe '{rec.name}' labels tokens and runs on an encoder; --adapters takes decoder recipes")
    if rec.method.type not in METHODS:
        why = {"dora": "DoRA's magnitude vector is not in the builder's LoRA path",
               "qlora": "QLoRA trains against the NF4 base, not the fp32 base the adapters share",
               "full": "a full fine-tune changes every weight: there is no adapter"}[rec.method.type]
        raise ToolchainError(f"recipe '{rec.name}': method '{rec.method.type}' cannot be a run-time adapter ({why}); "
                             f"--adapters takes {' or '.join(METHODS)} recipes (toolchain edge --method lora)")


def target_modules(src: Resolved, rec: Recipe) -> list[str]:
    targets = rec.method.target_modules or src.card.lora_target_modules
    if not targets or targets == ["all-linear"]:
        raise ToolchainError(f"recipe '{rec.name}': name the LoRA target modules (method.target_modules, or the "
                             f"model card's lora_target_modules): the shared base gets a LoRA input per module")
    return sorted(targets)


def _template(src: Resolved, targets: list[str], folder: Path) -> Path:
    """A rank-1 PEFT adapter on `targets`, never trained: it only tells the builder where the LoRA paths go."""
    from peft import LoraConfig, get_peft_model

    from toolchain.hf.models import load_causal_lm

    net = get_peft_model(load_causal_lm(src.path, src.trust_remote_code),
                         LoraConfig(r=1, lora_alpha=1, target_modules=targets, task_type="CAUSAL_LM"))
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_inputs(onnx_file: Path) -> dict[str, dict]:
    """The base's LoRA inputs: name -> {"dtype", "dims"} (the rank dimension as the string `lora_r`)."""
    import onnx

    m = onnx.load(str(onnx_file), load_external_data=False)
    return {i.name: {"dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower(),
                     "dims": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
            for i in m.graph.input if _is_lora(i.name)}


def _as_inputs(model, dtype: str) -> int:
    """Every LoRA initializer becomes a graph input of dynamic rank with an empty default of the same name (ONNX:
    an initializer named like an input is that input's default). fp16 inputs in an fp32 graph are cast to fp32 in
    the graph; an fp16 graph (the builder's CUDA and WebGPU models) takes fp16 adapters only."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    elem = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}[dtype]
    n = 0
    for init in [i for i in g.initializer if _is_lora(i.name)]:
        if init.data_type not in (elem, TensorProto.FLOAT):
            raise ToolchainError(f"this base computes its LoRA path in {TensorProto.DataType.Name(init.data_type)}: "
                                 f"its adapters are fp16 (--adapter-precision fp16), not {dtype}")
        cast = init.data_type != elem  # fp16 inputs, fp32 graph
        a = ".lora_A." in init.name
        k, m = init.dims
        g.initializer.remove(init)
        g.initializer.append(numpy_helper.from_array(np.zeros((k, 0) if a else (0, m), DTYPES[dtype]), init.name))
        g.input.append(helper.make_tensor_value_info(init.name, elem, [k, RANK] if a else [RANK, m]))
        if cast:
            to_fp32 = f"{init.name}/Cast_fp32"
            for node in g.node:
                node.input[:] = [to_fp32 if x == init.name else x for x in node.input]
            g.node.insert(0, helper.make_node("Cast", [init.name], [to_fp32], name=f"/lora_inputs/{init.name}/Cast",
                                              to=TensorProto.FLOAT))
        n += 1
    return n


def lora_matmuls(onnx_file: Path) -> list[str]:
    """The MatMul nodes of a base's LoRA paths (those fed by a LoRA input, directly or through its Cast)."""
    import onnx

    m = onnx.load(str(onnx_file), load_external_data=False)
    fed = {i.name for i in m.graph.input if _is_lora(i.name)}
    fed |= {o for n in m.graph.node if n.op_type == "Cast" and n.input[0] in fed for o in n.output}
    return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] in fed]


def build_base_for(src: Resolved, targets: list[str], target: str, exclude: list[str], out: Path) -> dict:
    """A builder target's base (cuda-fp16, cuda-int4, webgpu-int4) with LoRA inputs: onnxruntime-genai's builder at
    the target's precision and EP on the template adapter, the LoRA MatMuls (`exclude`, from the fp32 base) kept
    out of int4 (int4_nodes_to_exclude) so they stay in the model's float type (fp16), then made inputs as in
    build_base. Built on any host; only a host with the EP runs it."""
    import onnx
    from collections import Counter

    from toolchain.config.targets import get
    from toolchain.stages.export.decoder import export_genai
    from toolchain.stages.quantize.builder import BUILDER_OPTIONS

    t = get(target)
    options = BUILDER_OPTIONS[t["precision"]] + ((f"int4_nodes_to_exclude={','.join(exclude)}",) if t["precision"] == "int4" else ())
    t0 = time.time()
    with atomic_dir(Path(out)) as tmp, tempfile.TemporaryDirectory(prefix="toolchain-lora-base-") as work:
        template = _template(src, targets, Path(work) / "template")
        export_genai(src.path, tmp, t["precision"], Path(work), src.trust_remote_code, t["provider"],
                     options + (f"adapter_path={template}",))
        model = onnx.load(str(tmp / MODEL))
        n = _as_inputs(model, "fp16")
        for p in tmp.glob(MODEL + "*"):
            p.unlink()
        onnx.save(model, str(tmp / MODEL), save_as_external_data=True, location=MODEL + ".data")
        so = json.loads((tmp / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
        ops = Counter(x.op_type for x in model.graph.node)
        report = {"target": target, "builder_options": [o for o in options if not o.startswith("int4_nodes")],
                  "lora_matmuls_left_float": len(exclude), "lora_inputs": n, "adapter_dtype": "fp16",
                  "genai_provider_options": so.get("provider_options", []),
                  "ops": {k: ops[k] for k in ("MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention", "MatMul") if ops[k]},
                  "seconds": round(time.time() - t0, 1),
                  "size_mb": round(sum(p.stat().st_size for p in tmp.glob(MODEL + "*")) / 1e6, 2)}
        (tmp / "quantize_report.json").write_text(json.dumps(report, indent=2))
    return report


def build_base(src: Resolved, targets: list[str], out: Path, dtype: str = "fp32") -> dict:
    """The fp32 base with LoRA inputs on `targets` (an onnxruntime-genai folder), checked against torch with no
    adapter: the same parity check as the export stage. The quantize stage makes the shipped base from it."""
    import onnx

    from toolchain.stages.export.decoder import check_parity, export_genai

    if dtype not in DTYPES:
        raise ToolchainError(f"adapter precision '{dtype}': choose {' or '.join(DTYPES)}")
    t0 = time.time()
    with atomic_dir(Path(out)) as tmp, tempfile.TemporaryDirectory(prefix="toolchain-lora-base-") as work:
        template = _template(src, targets, Path(work) / "template")
        export_genai(src.path, tmp, "fp32", Path(work), src.trust_remote_code, options=(f"adapter_path={template}",))
        model = onnx.load(str(tmp / MODEL))
        n = _as_inputs(model, dtype)
        if n == 0:
            raise ToolchainError(f"the builder wrote no LoRA weights for target modules {targets}; check the names "
                                 f"against the model's projections (models/{src.card.name}.yaml lora_target_modules)")
        for p in tmp.glob(MODEL + "*"):
            p.unlink()
        onnx.save(model, str(tmp / MODEL), save_as_external_data=True, location=MODEL + ".data")
        parity = check_parity(tmp, src.path, "fp32", src.trust_remote_code)  # no adapter: the base itself
        if not parity["passed"]:
            raise ToolchainError(f"the base with LoRA inputs and no adapter differs from torch's base: max |logit diff| "
                                 f"{parity['max_abs_logit_diff']:.2e} > {parity['tolerance']:.0e}; nothing written to {out}")
        report = {"target_modules": targets, "lora_inputs": n, "adapter_dtype": dtype, "parity": parity,
                  "seconds": round(time.time() - t0, 1),
                  "size_mb": round(sum(p.stat().st_size for p in tmp.glob(MODEL + "*")) / 1e6, 2)}
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2))
    return report


# the builder's LoRA input names: model.layers.<i>.<attn|mlp>.<projection>.lora_<A|B>.MatMul.weight
BASE_NAME = re.compile(r"model\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.MatMul\.weight$")
PEFT_NAME = re.compile(r"layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight$")
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # the builder unpacks


def lora_parameters(adapter_dir: Path, base: dict[str, dict]) -> tuple[dict[str, np.ndarray], dict]:
    """A PEFT LoRA adapter's weights as the base's LoRA inputs (name -> array): A transposed to [in, r], B scaled by
    alpha/r (alpha/sqrt(r) for rsLoRA) and transposed to [r, out], a packed projection's B (Phi-3's qkv_proj,
    gate_up_proj) split along its outputs by the sizes of the base's inputs, its A shared. `base`: lora_inputs()."""
    from safetensors.numpy import load_file

    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise ToolchainError(f"{adapter_dir}: not a plain LoRA adapter (peft_type {cfg.get('peft_type')}, "
                             f"use_dora {cfg.get('use_dora')})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ToolchainError(f"{adapter_dir}: per-module ranks or alphas (rank_pattern / alpha_pattern) are not converted")
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    slots = {}
    for name, spec in base.items():
        layer, proj, ab = BASE_NAME.match(name).groups()
        slots[(int(layer), proj, ab)] = (name, spec)
    out = {}
    for key, w in load_file(str(Path(adapter_dir) / "adapter_model.safetensors")).items():
        m = PEFT_NAME.search(key)
        if not m:
            raise ToolchainError(f"{adapter_dir}: {key} is not a LoRA weight of a decoder layer's projection; the base "
                                 "has LoRA inputs on layer projections only")
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        parts = PACKED.get(proj, (proj,))
        missing = [p for p in parts if (layer, p, ab) not in slots]
        if missing:
            raise ToolchainError(f"{adapter_dir}: the adapter adapts layer {layer}'s {proj}, which the base has no LoRA "
                                 f"input for (the base's target modules are fixed when it is built)")
        w = w.astype(np.float32)
        if ab == "A":  # [r, in] -> [in, r], shared by a packed projection's parts
            for p in parts:
                name, spec = slots[(layer, p, ab)]
                if w.shape[1] != spec["dims"][0]:
                    raise ToolchainError(f"{adapter_dir}: {key} is {list(w.shape)}; the base's {name} is {spec['dims']}")
                out[name] = np.ascontiguousarray(w.T)
            continue
        sizes = [slots[(layer, p, ab)][1]["dims"][1] for p in parts]  # B: [out, r] -> [r, out], split along out
        if w.shape[0] != sum(sizes):
            raise ToolchainError(f"{adapter_dir}: {key} is {list(w.shape)}; the base's {'+'.join(parts)} take {sum(sizes)} "
                                 "outputs")
        for p, piece in zip(parts, np.split(w, np.cumsum(sizes)[:-1], axis=0)):
            out[slots[(layer, p, ab)][0]] = np.ascontiguousarray((piece * scale).T)
    return out, cfg


def adapter_parity(base_dir: Path, adapter_file: Path, src: Resolved, adapter_dir: Path, tolerance: float) -> dict:
    """Prompt logits of the ONNX base with the .onnx_adapter (through onnxruntime-genai) against torch's base with
    the PEFT adapter, unmerged, on the export stage's prompts: every LoRA weight takes part."""
    import gc

    import torch
    from peft import PeftModel

    from toolchain.hf.models import load_causal_lm, load_tokenizer, user_prompt
    from toolchain.runtime import genai
    from toolchain.stages.merge import PROMPTS

    tok = load_tokenizer(src.path, src.trust_remote_code)
    seqs = [tok(user_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    model, _ = genai.load(Path(base_dir), adapter=Path(adapter_file))
    import onnxruntime_genai as og

    got = []
    for ids in seqs:
        params = og.GeneratorParams(genai.base_model(model))
        params.set_search_options(max_length=len(ids) + 1)
        gen = genai.new_generator(model, params)
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        got.append(np.asarray(gen.get_output("logits"), dtype=np.float32)[0])
    del model, gen
    gc.collect()
    net = PeftModel.from_pretrained(load_causal_lm(src.path, src.trust_remote_code), str(adapter_dir)).eval()
    with torch.no_grad():
        want = [net(torch.tensor([ids])).logits[0].float().numpy() for ids in seqs]
    diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    agree = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want)) / sum(len(w) for w in want)
    return {"max_abs_logit_diff": diff, "top1_agreement": agree, "positions": sum(len(w) for w in want),
            "tolerance": tolerance, "passed": diff <= tolerance}


def write_adapter(weights: dict[str, np.ndarray], path: Path, dtype: str = "fp32") -> None:
    """ONNX Runtime's adapter format. OrtValue.ortvalue_from_numpy wraps the array's memory without copying it:
    every array stays referenced here until the file is written (a temporary from astype would be freed first,
    and the file would hold whatever reused that memory)."""
    import onnxruntime as ort

    arrays = {k: np.ascontiguousarray(v, dtype=DTYPES[dtype]) for k, v in weights.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()})
    fmt.export_adapter(str(path))
    del fmt, arrays


# fp16 adapter weights: a relative error of 2^-11 per weight, on a delta that is a small part of each logit. Measured
# on the tiny Phi-3 of the tests: max |logit diff| vs torch 3e-6 (fp16) against 2e-7 (fp32)
PARITY = {"fp32": 1e-3, "fp16": 1e-2}


def convert(src: Resolved, adapter_dir: Path, base_dir: Path, out: Path, dtype: str = "fp32") -> dict:
    """The PEFT adapter in `adapter_dir` (trained on src) as `out`/adapter.onnx_adapter for the fp32 base in
    `base_dir` (build_base): every parameter one of the base's LoRA inputs, of its sizes; then the base with it is
    checked against torch's base with the adapter (adapter_parity), and nothing is written if they differ.

    The weights are mapped here, not taken from a builder run with `adapter_path` per adapter: the same arrays
    (tests/test_adapters.py compares them) without exporting the whole model again for each recipe."""
    weights, cfg = lora_parameters(adapter_dir, lora_inputs(Path(base_dir) / MODEL))
    with atomic_dir(Path(out)) as tmp:
        write_adapter(weights, tmp / ADAPTER_FILE, dtype)
        parity = adapter_parity(base_dir, tmp / ADAPTER_FILE, src, adapter_dir, PARITY[dtype])
        if not parity["passed"]:
            raise ToolchainError(f"adapter parity failed: max |logit diff| {parity['max_abs_logit_diff']:.2e} > "
                                 f"{parity['tolerance']:.0e} between torch (base + {adapter_dir}) and the ONNX base with "
                                 f"the converted adapter; nothing written to {out}")
        info = {"rank": cfg["r"], "alpha": cfg["lora_alpha"], "rslora": bool(cfg.get("use_rslora")),
                "target_modules": sorted(cfg["target_modules"]), "dtype": dtype,
                "parameters": int(sum(w.size for w in weights.values())), "tensors": len(weights),
                "size_mb": round((tmp / ADAPTER_FILE).stat().st_size / 1e6, 3), "sha256": sha256_file(tmp / ADAPTER_FILE),
                "parity": parity}
        (tmp / "adapter.json").write_text(json.dumps(info, indent=2))
    return info


def package_adapters(base_q: Path, entries: dict[str, dict], out: Path, manifest: Manifest) -> Path:
    """The multi-adapter artifact: the quantized base folder, adapters/<name>.onnx_adapter and
    adapters/<name>.eval.jsonl for every entry ({"adapter": file, "eval": file, "entry": manifest entry}), the
    retention set (retention.jsonl, as every decoder artifact ships it), and manifest.json last (every file's sha256, each adapter's own sha256 in its entry)."""
    from toolchain.stages.package import stamp_genai_config, versions
    from toolchain.runtime import manifest as man_mod

    with atomic_dir(Path(out)) as tmp:
        for p in Path(base_q).iterdir():
            if p.is_file() and p.name not in ("quantize_report.json", "export_report.json"):
                shutil.copy2(p, tmp / p.name)
        (tmp / ADAPTERS_DIR).mkdir()
        adapters = {}
        for name, e in entries.items():
            shutil.copy2(e["adapter"], tmp / rt.adapter_path(name))
            shutil.copy2(e["eval"], tmp / rt.eval_path(name))
            adapters[name] = {**e["entry"], "file": rt.adapter_path(name), "eval": rt.eval_path(name),
                              "sha256": sha256_file(tmp / rt.adapter_path(name))}
        general = [Path(e["eval"]).parent / RETENTION_FILE for e in entries.values()]  # the same set, one tokenizer
        if general and general[0].is_file():
            shutil.copy2(general[0], tmp / RETENTION_FILE)
        stamp_genai_config(tmp, manifest.target)
        done = manifest.model_copy(update={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                           "versions": versions(), "adapters": adapters,
                                           "files": man_mod.file_hashes(tmp)})
        (tmp / man_mod.MANIFEST).write_text(json.dumps(done.out(), indent=2))
    return Path(out)
