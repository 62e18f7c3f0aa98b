"""One base on the device, many adapters swapped at run time: `toolchain edge --adapters A,B,C` and
`toolchain adapters add ARTIFACT --recipe D`.

    finetune-<recipe>   the fine-tune stage, once per recipe, on the same base (cached per recipe)
    base-lora           the base, exported once at fp32 with LoRA inputs on the recipes' target modules
                        (stages/adapters.py build_base), checked against torch with no adapter
    base-<target>       that base quantized for the target (quantize/nbits.py; the LoRA MatMuls stay float)
    adapter-<recipe>    the recipe's adapter as an .onnx_adapter for that base (stages/adapters.py convert)
    reference-<recipe>  the recipe's held-out split and the fp32 base's figures with that adapter
    <target>/           the artifact (runtime/adapters.py describes it), validated in its own process

under artifacts/<model>-adapters/ (with --adapter-precision fp16, the base, adapter and reference stages and the
artifact folder take a -fp16 suffix beside the fp32 ones; the fine-tunes are shared). Every stage is the engine's: an unchanged recipe reuses its fine-tune,
adapter and reference, an unchanged set of target modules reuses the base.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from toolchain.config import targets as targets_mod
from toolchain.config.catalog import load_recipe
from toolchain.config.schema import Launch
from toolchain.config.sources import Resolved, resolve
from toolchain.engine import Stages, console, files_hash, validate_in_own_process
from toolchain.runtime import manifest as man_mod
from toolchain.runtime.adapters import adapter_path, entries, eval_path
from toolchain.runtime.contracts import Manifest
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir, sha256_file
from toolchain.runtime.manifest import EVAL_FILE

BASE_STAGE = "base-lora"


def suffix(dtype: str) -> str:
    """fp16 adapters get stages (and an artifact folder) of their own beside the fp32 ones; fine-tunes are shared."""
    return "" if dtype == "fp32" else f"-{dtype}"


# onnxruntime-genai feeds an adapter's parameters as ONNX Runtime LoRA inputs (OrtLoraAdapter); on DirectML it does not
# run adapters (a known limitation of onnxruntime-genai; no DirectML on a Linux build host to show it here), so such an
# artifact is refused rather than built broken
UNSUPPORTED = {"dml": "onnxruntime-genai does not run LoRA adapters on DirectML (DmlExecutionProvider)"}


def check_target(target: str, adapter_dtype: Optional[str]) -> tuple[dict, str]:
    """The target and its adapters' precision, or a clear refusal. CPU targets are quantized from the fp32 base
    (fp32 adapters unless fp16 is asked for); builder targets (CUDA, WebGPU) compute in fp16, their adapters too."""
    t = targets_mod.get(target)
    if t["provider"] in UNSUPPORTED:
        raise ToolchainError(f"--adapters with {target}: not supported: {UNSUPPORTED[t['provider']]}. Build one merged "
                             f"artifact per recipe for {target} (toolchain edge --recipe R --target {target}), or "
                             "use --adapters with cpu-int4")
    if t["built_by"] not in ("quantize", "builder"):
        raise ToolchainError(f"--adapters with {target}: not supported: a static QDQ graph (built_by {t['built_by']}) "
                             "has no float LoRA path to feed; use cpu-int4")
    if t["built_by"] == "builder":
        if adapter_dtype not in (None, "fp16"):
            raise ToolchainError(f"--adapters with {target}: the base computes in fp16 on {t['provider']}, so do its "
                                 "adapters; use --adapter-precision fp16 (or leave it out)")
        return t, "fp16"
    return t, adapter_dtype or "fp32"


def weights_hash(src: Resolved) -> str:
    """The base weights' hash, as the manifest's `inputs.weights` of every artifact records it."""
    return files_hash(sorted(src.path.glob("*.safetensors")) + [src.path / "config.json"])


def _scores(scores: Optional[dict]) -> dict:
    return {k: v for k, v in (scores or {}).items() if k != "samples"}


def _base_stage(st: Stages, src: Resolved, weights: str, targets: list[str], dtype: str):
    from toolchain.stages.adapters import build_base

    return st.run(BASE_STAGE + suffix(dtype), {"model": src.card.name, "weights": weights, "targets": targets, "dtype": dtype},
                  lambda o: build_base(src, targets, o, dtype))


def _adapter_stages(st: Stages, src: Resolved, rec, rec_file: Path, base, weights: str, dtype: str,
                    launch: Launch) -> dict:
    """fine-tune -> convert -> reference for one recipe; returns what packaging takes for it."""
    from toolchain.pipeline import finetune_inputs
    from toolchain.stages.adapters import ADAPTER_FILE, convert
    from toolchain.stages.finetune.decoder import finetune
    from toolchain.stages.reference import reference

    ft_in = finetune_inputs(src, rec, rec_file, launch)
    data = ft_in["data"]
    # `edge --recipe R` keys its fine-tune the same way: an unchanged one there is taken, not trained again
    ft = st.run(f"finetune-{rec.name}", ft_in, lambda o: finetune(src, rec, rec_file, o, launch=launch),
                borrow=st.root.parent / f"{src.card.name}-{rec.name}" / "stages" / "finetune")
    sfx = suffix(dtype)
    cv = st.run(f"adapter-{rec.name}{sfx}", {"finetune": ft.key, "base": base.key, "dtype": dtype},
                lambda o: convert(src, ft.out / "adapter", base.out, o, dtype))
    rf = st.run(f"reference-{rec.name}{sfx}", {"adapter": cv.key, "recipe": rec.model_dump(include={"data", "metric"})},
                lambda o: reference(base.out, src.path, rec, rec_file, o, adapter=cv.out / ADAPTER_FILE))
    s = cv.summary
    entry = {"recipe": rec.model_dump(), "method": rec.method.type, "rank": s["rank"], "alpha": s["alpha"],
             "target_modules": s["target_modules"], "dtype": s["dtype"], "parameters": s["parameters"],
             "size_mb": s["size_mb"], "base_weights": weights, "data": data,
             "training": {"method": ft.summary.get("method", rec.method.type), **(ft.summary.get("train") or {})},
             "reference": {"torch_base": _scores(ft.summary.get("base")), "torch_tuned": _scores(ft.summary.get("tuned")),
                           "onnx_fp32": rf.summary},
             "lineage": [{"stage": x, "key": o.key} for x, o in ((f"finetune-{rec.name}", ft), (f"adapter-{rec.name}{sfx}", cv),
                                                                  (f"reference-{rec.name}{sfx}", rf))]}
    return {"adapter": cv.out / ADAPTER_FILE, "eval": rf.out / EVAL_FILE, "entry": entry,
            "keys": [ft.key, cv.key, rf.key]}


def _recipes(names: list[str], max_steps: Optional[int], method: Optional[str] = None):
    from toolchain.stages.adapters import check_recipe

    if not names:
        raise ToolchainError("--adapters: name at least one recipe (e.g. --adapters chat-lora,classify)")
    out = [load_recipe(n, max_steps=max_steps, method=method) for n in names]
    seen = {}
    for (rec, f), n in zip(out, names):
        if rec.name in seen:
            raise ToolchainError(f"--adapters: {n} and {seen[rec.name]} are both recipe '{rec.name}'; adapters are "
                                 "named by their recipe, give each once")
        seen[rec.name] = n
        check_recipe(rec)
    return out


def edge_adapters(model: Optional[str], recipes: list[str], target: str = "cpu-int4", out: Path = Path("artifacts"),
                  max_steps: Optional[int] = None, model_path: Optional[str] = None, trust_remote_code: bool = False,
                  force: bool = False, adapter_dtype: Optional[str] = None, launch: Launch = Launch(),
                  method: Optional[str] = None) -> dict:
    """Build and validate artifacts/<model>-adapters/<target>/: one base, one .onnx_adapter per recipe.
    adapter_dtype: fp32 or fp16 (default: fp32 on CPU targets, fp16 on builder targets, the only choice there)."""
    from toolchain.stages.adapters import DTYPES, package_adapters, target_modules

    t, adapter_dtype = check_target(target, adapter_dtype)
    if adapter_dtype not in DTYPES:
        raise ToolchainError(f"--adapter-precision {adapter_dtype}: choose {' or '.join(DTYPES)}")
    recs = _recipes(recipes, max_steps, method)
    src = resolve(model or recs[0][0].model, model_path, trust_remote_code)  # fails fast, before any work
    if src.card.kind == "encoder":
        raise ToolchainError(f"model '{src.card.name}' is an encoder; --adapters builds decoders")
    root = Path(out) / f"{src.card.name}-adapters"
    st = Stages(root, force)
    weights = weights_hash(src)
    targets = sorted({m for rec, _ in recs for m in target_modules(src, rec)})
    base = _base_stage(st, src, weights, targets, adapter_dtype)  # fp32 graph: references, parity, the CPU targets
    name, q = _target_base(st, src, t, recs[0][0], base, weights, targets, adapter_dtype)
    built = {rec.name: _adapter_stages(st, src, rec, f, base, weights, adapter_dtype, launch) for rec, f in recs}
    desc = {**t, "name": target, "exporter": "onnxruntime-genai builder (adapter_path) + LoRA inputs",
            "quantize": q.summary, "adapter_dtype": adapter_dtype}
    if t["built_by"] == "builder":
        desc["provider_options"] = {k: v for e in q.summary["genai_provider_options"] for k, v in e.get(t["provider"], {}).items()}
    manifest = Manifest(model_card=src.card.model_dump(), recipe={"name": "adapters", "adapters": list(built)},
                        target=desc, versions={}, inputs={"weights": weights}, reference={},
                        lineage=[{"stage": s, "key": k} for s, k in ((BASE_STAGE + suffix(adapter_dtype), base.key),
                                                                     (f"base-{name}", q.key))],
                        base={"weights": weights, "target_modules": targets, "lora_inputs": base.summary["lora_inputs"],
                              "adapter_dtype": adapter_dtype, "parity": base.summary["parity"],
                              "quantize_settings_from": recs[0][0].name})
    pkg_in = {"quantize": q.key, "adapters": {n: b["keys"] for n, b in built.items()},
              "recipes": {n: b["entry"]["recipe"] for n, b in built.items()}}
    art = st.run(name, pkg_in, out=root / name, fn=lambda o: {
        "path": str(package_adapters(q.out, built, o, manifest))})
    return _validated(art.out, dict(st.reused))


def _target_base(st: Stages, src: Resolved, t: dict, first, base, weights: str, targets: list[str], dtype: str):
    """(artifact folder name, the stage of the shipped base): quantized from the fp32 base for a CPU target (with the
    first recipe's int4 settings), built by onnxruntime-genai's builder for a CUDA or WebGPU one."""
    if t["built_by"] == "builder":
        from toolchain.stages.adapters import MODEL, build_base_for, lora_matmuls
        from toolchain.stages.quantize.builder import BUILDER_OPTIONS

        exclude = lora_matmuls(base.out / MODEL)
        q = st.run(f"base-{t['name']}", {"model": src.card.name, "weights": weights, "targets": targets,
                                          "target": t["name"], "options": BUILDER_OPTIONS[t["precision"]]},
                   lambda o: build_base_for(src, targets, t["name"], exclude, o))
        return t["name"], q
    from toolchain.stages.quantize.nbits import quantize, spec_for

    spec = spec_for(t["name"], first.quantize)
    name = t["name"] + suffix(dtype)  # the artifact folder: cpu-int4, or cpu-int4-fp16 for fp16 adapters
    return name, st.run(f"base-{name}", {"base": base.key, "target": t["name"], "spec": spec.model_dump()},
                        lambda o: quantize(base.out, t["name"], o, spec))


def _validated(art: Path, reused: dict, adapter: Optional[str] = None) -> dict:
    console.print(f"[bold]validate[/bold] {art}")
    if adapter is None:
        report = validate_in_own_process(art)
    else:
        r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(art), "--adapter", adapter, "--json"],
                           stdout=subprocess.PIPE)
        if r.returncode not in (0, 1, 3):
            raise ToolchainError(f"validation of {art} failed (exit {r.returncode}); run `toolchain validate {art}`")
        report = json.loads(r.stdout)
    (art / "report.md").write_text(markdown(report))
    report["headline"] = headline(report, reused)
    return report


def headline(rep: dict, reused: dict) -> dict:
    """What `toolchain edge --adapters` prints: sizes (one base plus N adapters against N merged artifacts of the
    base's size), per adapter its metric against tuned torch and fp32 ONNX, and the switch time."""
    m = rep["measured"]
    n = len(m["adapters_mb"])
    h = {"artifact": rep["artifact"], "status": rep["status"], "base_mb": m["base_mb"], "size_mb": m["size_mb"],
         "adapters": len(m["adapters_mb"]), "merged_equivalent_mb": n * m["base_mb"], "stages_reused": reused}
    if rep.get("validated"):
        h["per_adapter"] = {name: {"metric": r["metric"], "artifact": r["measured"].get(r["metric"]),
                                   "tuned_torch": r["reference"]["torch_tuned"].get(r["metric"]),
                                   "onnx_fp32": r["reference"]["onnx_fp32"].get(r["metric"]),
                                   "base_alone": rep["base"][name].get(r["metric"]),
                                   "base_torch": r["reference"]["torch_base"].get(r["metric"]),
                                   "retention": r["measured"].get("retention"),
                                   "retention_base_torch": r["reference"]["torch_base"].get("retention"),
                                   "adapter_mb": m["adapters_mb"][name], "status": r["status"]}
                            for name, r in rep["adapters"].items()}
        h["switch_ms"] = rep["switch"]["activate_ms_switched_p50"]
    return h


def _f(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def markdown(rep: dict) -> str:
    """report.md of a multi-adapter artifact."""
    m = rep["measured"]
    lines = [f"# {rep['target']} — one base, {len(m['adapters_mb'])} adapters — {rep['artifact']}", "",
             f"Base {m['base_mb']:.2f} MB + adapters {sum(m['adapters_mb'].values()):.2f} MB = {m['size_mb']:.2f} MB "
             f"(one merged artifact per recipe: about {len(m['adapters_mb']) * m['base_mb']:.2f} MB).", ""]
    if not rep.get("validated"):
        return "\n".join(lines + [f"**{rep.get('reason')}.** Nothing else was measured.", ""])
    lines += ["| adapter | metric | base torch | tuned torch | fp32 ONNX + adapter | this artifact | base alone | "
              "retention (base torch / artifact) | decode tok/s | adapter MB | gates |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in sorted(rep["adapters"].items()):
        k, ref, mm = r["metric"], r["reference"], r["measured"]
        gates = "pass" if r["passed"] else "MISS " + ", ".join(g["gate"] for g in r["gates"] if not g["passed"])
        lines.append(f"| {n} | {k} | {_f(ref['torch_base'].get(k))} | {_f(ref['torch_tuned'].get(k))} | "
                     f"{_f(ref['onnx_fp32'].get(k))} | {_f(mm.get(k))} | {_f(rep['base'][n].get(k))} | "
                     f"{_f(ref['torch_base'].get('retention'))} / {_f(mm.get('retention'))} | "
                     f"{_f(mm.get('decode_tok_s_p50'), '.1f')} | {_f(mm['adapter_mb'], '.2f')} | {gates} |")
    sw = rep["switch"]
    lines += ["", f"Switching ({sw['requests']} requests over the base and {sw['adapters']} adapters): a new generator "
              f"with another adapter active {sw['activate_ms_switched_p50']:.3f} ms p50 (same adapter "
              f"{sw['activate_ms_same_p50']:.3f} ms); first token {sw['first_token_ms_switched_p50']:.2f} ms after a "
              f"switch, {sw['first_token_ms_same_p50']:.2f} ms without.", ""]
    return "\n".join(lines)


def add_adapter(artifact: Path, recipe: str, max_steps: Optional[int] = None, model: Optional[str] = None,
                model_path: Optional[str] = None, trust_remote_code: bool = False, force: bool = False,
                launch: Launch = Launch(), method: Optional[str] = None) -> dict:
    """Train, convert and validate one more adapter for an existing multi-adapter artifact; the shipped base is not
    rebuilt (its files are copied unchanged), and a base other than the artifact's (by weights hash) is refused."""
    from toolchain.stages.adapters import MODEL, lora_inputs, target_modules

    artifact = Path(artifact)
    man = man_mod.verify(artifact)
    have = entries(man, artifact)
    card = man["model_card"]
    src = resolve(model or card.get("source", {}).get("path") or card["name"], model_path, trust_remote_code)
    weights = weights_hash(src)
    if weights != man["base"]["weights"]:
        raise ToolchainError(f"{artifact}: its base weights are {man['base']['weights']}, {src.path} hashes to {weights}: "
                             "an adapter trained on another base computes nonsense on this one; pass the artifact's "
                             f"base (--model / --model-path; it was built from {card['name']})")
    (rec, rec_file), = _recipes([recipe], max_steps, method)
    if rec.name in have:
        raise ToolchainError(f"{artifact}: it already has adapter '{rec.name}'; rebuild the artifact with "
                             "`toolchain edge --adapters ...` to replace one")
    missing = sorted(set(target_modules(src, rec)) - set(man["base"]["target_modules"]))
    if missing:
        raise ToolchainError(f"recipe '{rec.name}' adapts {', '.join(missing)}, which this artifact's base has no LoRA "
                             f"inputs for (it has {', '.join(man['base']['target_modules'])}); set the recipe's "
                             "method.target_modules to a subset, or rebuild with --adapters")
    st = Stages(artifact.parent, force)
    dtype = man["base"]["adapter_dtype"]
    base = _base_stage(st, src, weights, man["base"]["target_modules"], dtype)  # the fp32 reference model
    if lora_inputs(base.out / MODEL) != lora_inputs(artifact / MODEL):
        raise ToolchainError(f"{artifact}: the shipped base's LoRA inputs differ from the fp32 base rebuilt here "
                             "(another onnxruntime-genai builder?); rebuild the artifact with `toolchain edge --adapters`")
    b = _adapter_stages(st, src, rec, rec_file, base, weights, dtype, launch)
    with atomic_dir(artifact) as tmp:
        for p in artifact.rglob("*"):
            rel = p.relative_to(artifact).as_posix()
            if p.is_file() and rel in man["files"]:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / rel)
        shutil.copy2(b["adapter"], tmp / adapter_path(rec.name))
        shutil.copy2(b["eval"], tmp / eval_path(rec.name))
        man["adapters"][rec.name] = {**b["entry"], "file": adapter_path(rec.name), "eval": eval_path(rec.name),
                                     "sha256": sha256_file(tmp / adapter_path(rec.name))}
        man["recipe"]["adapters"] = list(man["adapters"])
        man["files"] = man_mod.file_hashes(tmp)
        Manifest.model_validate(man)
        (tmp / man_mod.MANIFEST).write_text(json.dumps(man, indent=2))
    # the artifact no longer is what `edge --adapters` keyed: the next one repackages it
    (artifact.parent / "stages" / ".keys" / f"{artifact.name}.json").unlink(missing_ok=True)
    return _validated(artifact, dict(st.reused), adapter=rec.name)
