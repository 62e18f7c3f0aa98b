"""An artifact's model card, README.md: Hugging Face-style YAML front matter (base_model, license, tags,
pipeline_tag, library_name), then how it was made and what it scored. It is written with the reports, after
validation, since it carries the scores; the manifest does not hash it (runtime/manifest.OUTPUTS)."""
from __future__ import annotations

import re
from pathlib import Path

from toolchain.runtime import manifest as manifest_mod
from toolchain.runtime.manifest import MODEL_CARD


def _fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def write_model_card(artifact: Path, rep: dict) -> None:
    (Path(artifact) / MODEL_CARD).write_text(model_card(manifest_mod.read(Path(artifact)), rep))


def _hf_license(text: str) -> dict:
    """The card's license as Hub metadata: an identifier (apache-2.0, mit, ...) as is, anything else as 'other'."""
    lic = text.strip().lower()
    if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", lic):
        return {"license": lic}
    return {"license": "other", "license_name": re.sub(r"[^a-z0-9]+", "-", lic).strip("-") or "unknown"}


def _quantization(target: dict) -> str:
    """How the weights were quantized, in one line, from the quantize stage's summary in the manifest."""
    q = target.get("quantize") or {}
    if {"algo", "block_size"} <= set(q):
        parts = [f"{q['algo'].upper()} {target['precision']} weights (MatMulNBits), block {q['block_size']}, "
                 f"{'symmetric' if q.get('symmetric') else 'asymmetric'}, accuracy level {q.get('accuracy_level')}",
                 f"lm_head {str(q.get('lm_head_bits', 4)) + '-bit' if q.get('lm_head') else 'fp32'}",
                 f"embedding {q.get('embedding', 'fp32')}"]
        if q.get("int8"):
            parts.append(f"8-bit {', '.join(q['int8'])}")
        if q.get("int8_edge_layers"):
            parts.append(f"first and last {q['int8_edge_layers']} layers 8-bit")
        if q.get("prune_lm_head"):
            parts.append("logits for the last position only")
        return "; ".join(parts)
    scalars = {k: v for k, v in q.items() if isinstance(v, (str, int, float, bool)) and k not in ("seconds", "target")}
    return target.get("method") or ", ".join(f"{k} {v}" for k, v in scalars.items()) or target["precision"]


def model_card(man: dict, rep: dict) -> str:
    """README.md for a decoder artifact: Hub-style YAML front matter (base_model, license from the model card, tags,
    pipeline_tag, library_name), then how it was made and what it scored."""
    import yaml

    from toolchain.stages.package import artifact_name

    card, recipe, target = man["model_card"], man["recipe"], man["target"]
    training = man.get("training") or {}
    method = training.get("method", recipe["method"]["type"])
    name = artifact_name(man)
    gguf = target.get("built_by") == "llama.cpp"
    runtime_tags = ["gguf", "llama.cpp"] if gguf else ["onnx", "onnxruntime-genai"]
    front = {"base_model": card.get("base_model") or card["source"].get("hub") or card["name"],
             **_hf_license(card["license"]), "library_name": "gguf" if gguf else "onnxruntime-genai",
             "pipeline_tag": "text-generation",
             "tags": list(dict.fromkeys(runtime_tags + [target["precision"], target["name"]]
                                        + ([] if gguf else [f"{target['provider']}-ep"])
                                        + [method, recipe["task"], "edge-toolchain"]))}
    m, ref, metric = rep.get("measured", {}), rep.get("reference", {}), rep.get("metric") or recipe["metric"]["name"]
    mth = recipe["method"]
    how = [f"| base model | `{front['base_model']}` ({card.get('params', '?')} parameters, {card['architecture']}) |",
           f"| recipe | `{recipe['name']}` ({recipe['task']}): {recipe.get('description') or ''} |",
           f"| method | {method}" + (f", r {mth['r']}, alpha {mth['alpha']}" if method != "full" else "")
           + (f", {training['steps']} steps at {training.get('precision')}, {training.get('ranks', 1)} rank(s)"
              if "steps" in training else "") + " |",
           f"| data | {recipe['data'].get('origin', '')} (license: {recipe['data'].get('license', '')}) |"]
    how += [f"| {k} | `{Path(f['path']).name}` sha256 `{f['sha256'][:16]}…` |"
            for k, f in (man.get("inputs", {}).get("data_files") or {}).items()]
    if man.get("overrides"):
        how.append("| overrides | " + ", ".join(f"`{o}`" for o in man["overrides"]) + " |")
    how += [f"| export | {target.get('exporter', '')} " + ("(from the merged fp32 HF folder) |" if gguf else
                                                            "(fp32 ONNX, checked against torch) |"),
            f"| target | `{target['name']}`: {target['precision']} on {target['ep']} |",
            f"| quantization | {_quantization(target)} |"]
    if rep.get("validated", True):
        status = "all gates passed" if rep.get("passed") else "GATES MISSED"
        scores = [(f"Validated with llama.cpp ({rep.get('note')}), {status}, " if gguf else
                   f"Validated with ONNX Runtime GenAI on `{rep.get('provider', target['provider'])}` ({status}), ")
                  + f"{m.get('eval_examples', 'n/a')} held-out examples.", "",
                  "| figure | this artifact | fp32 ONNX | tuned torch | base torch |", "|---|---|---|---|---|"]
        for k in dict.fromkeys(["perplexity", metric]):
            if k in m or k in ref.get("onnx_fp32", {}):
                scores.append(f"| {k} | {_fmt(m.get(k))} | {_fmt(ref.get('onnx_fp32', {}).get(k))} | "
                              f"{_fmt(ref.get('torch_tuned', {}).get(k))} | {_fmt(ref.get('torch_base', {}).get(k))} |")
        scores += [f"| decode tok/s (p50) | {_fmt(m.get('decode_tok_s_p50'), '.1f')} | | | |",
                   f"| size (MB) | {_fmt(m.get('size_mb'), '.1f')} | | | |"]
        scores += [""] + [f"- {'PASS' if g['passed'] else 'MISS'} `{g['gate']}`: {_fmt(g['value'])} (limit {g['limit']})"
                          for g in rep.get("gates", [])] + (["- no gates set"] if not rep.get("gates") else [])
    else:
        scores = [f"Not validated on the build host: {rep.get('reason')}. Size {_fmt(m.get('size_mb'), '.1f')} MB; run "
                  f"`toolchain validate` on a machine with {'llama-cpp-python' if gguf else 'the execution provider'}."]
    made = "converted to GGUF by llama.cpp's own tools" if gguf else "exported to ONNX and quantized"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"{card['name']} fine-tuned by recipe `{recipe['name']}` ({method}), {made} for "
             f"`{target['name']}`. Made with edge-toolchain; `manifest.json` records every input and file hash.", "",
             "## How it was made", "", "| | |", "|---|---|"] + how + ["", "## Scores", ""] + scores + [
             "", "## Use", "", _use(man, name), ""]
    return "\n".join(lines)


def _use(man: dict, name: str) -> str:
    """The model card's one paragraph on running the artifact."""
    if man["target"].get("built_by") == "llama.cpp":
        gguf = next((f for f in man.get("files", {}) if f.endswith(".gguf")), "model.gguf")
        return (f"With llama.cpp: `llama-cli -m {gguf}` (the vocabulary and chat template are in the file), or from "
                f"Python `llama_cpp.Llama(model_path=\"{gguf}\")`. Check it on a device with `toolchain validate "
                "<folder>` (needs llama-cpp-python).")
    return (f"With onnxruntime-genai {man.get('versions', {}).get('onnxruntime-genai', '')}: "
            "`onnxruntime_genai.Model(\"path/to/this/folder\")`. Foundry Local finds the folder by its "
            f"`inference_model.json` (model name `{name}`). Check it on a device with `toolchain validate <folder>`.")
