"""The mission as code: take a language model to a folder you can copy to a device, with a report you can trust.

    finetune -> merge -> export -> reference -> quantize -> package -> validate
    (PEFT)      (HF)     (ONNX)    (fp32 ONNX)  (int4/8)    (manifest) (ORT: latency, accuracy, gates)

Each stage is a module under stages/ with one entry function that takes the resolved model and recipe (config/)
and writes one folder. `edge` runs them for one model, recipe and target, under artifacts/<model>-<recipe>/:
intermediate folders in stages/, the artifact in <target>/. The engine reuses a stage whose inputs are unchanged
(content-hashed key in stages/.keys/); every stage writes atomically, so a run killed mid-stage resumes at that
stage. --force redoes everything. Encoders (classify-encoder, ner) take the same chain with their own stage
functions and no GenAI folder.

A model larger than hf.models.LARGE_MODEL_BYTES (Phi-3-mini: 7.6 GB in bf16) never exists in fp32: it trains and
merges in its own dtype (the merge shard by shard), skips the fp32 ONNX export (15 GB for Phi-3-mini), takes its
reference figures from the merged torch model (reference-torch), and cpu-int4 is built by the onnxruntime-genai
builder with each weight quantized as it is reached (stages/quantize/builder.py build_large_int4).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from toolchain import auto as auto_mod
from toolchain import report as report_mod
from toolchain.config import targets
from toolchain.config.catalog import RETENTION_SET, open_recipe
from toolchain.config.fit import GB, check_fit
from toolchain.config.schema import Launch, QuantizeSpec, Recipe
from toolchain.config.sources import Resolved, resolve
from toolchain.engine import Stages, console, files_hash, validate_in_own_process
from toolchain.runtime.contracts import Manifest
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import sha256_file
from toolchain.runtime.manifest import EVAL_FILE


@dataclass(frozen=True, kw_only=True)
class Run:
    """The shared stages of one model and recipe: everything a target is built from."""
    st: Stages
    root: Path
    src: Resolved
    recipe: Recipe
    rec_file: Path
    exporter: str  # for a large model: "genai" (the builder, at build_target)
    inputs: dict  # hashes of the base weights and the data: the manifest's `inputs`
    finetune_key: str
    merged: Path
    merged_key: str
    export: Optional[Path]  # None for a large model: no fp32 ONNX export
    export_key: Optional[str]
    reference_dir: Path
    reference_key: str
    reference: dict  # torch_base, torch_tuned, onnx_fp32 figures
    training: dict  # method, precision, ranks, ZeRO stage
    base_lineage: list
    overrides: tuple = ()  # the command line's changes to the recipe file, KEY=VALUE (the manifest records them)


def _inputs(src: Resolved, rec: Recipe, rec_file: Path) -> dict:
    """What the fine-tune is made from, by content: a changed data file (the recipe's or the user's --data) or
    changed weights change the stage keys. The manifest keeps each data file's path and sha256."""
    weights = sorted(src.path.glob("*.safetensors")) + [src.path / "config.json"]
    data_files = {f"data.{k}": rec_file.parent / f for k, f in (("train", rec.data.train), ("eval", rec.data.eval)) if f}
    return {"weights": files_hash(weights), "data": files_hash(list(data_files.values())),
            "data_files": {k: {"path": str(p.resolve()), "sha256": sha256_file(p)} for k, p in data_files.items()}}


def check_data(rec: Recipe, rec_file: Path, kind: str) -> None:
    """Read every data file the run will train and score on, before any stage (or folder) exists: a bad line fails
    here with file:line, and nothing is written."""
    from toolchain.runtime import encoder as rt_encoder
    from toolchain.runtime.rows import read_jsonl

    for f in (rec.data.train, rec.data.eval):
        if f:
            if kind == "encoder":
                rt_encoder.read_rows(rec_file.parent / f, rec.task)
            else:
                read_jsonl(rec_file.parent / f)


def _scores(scores: Optional[dict]) -> dict:
    """Torch scores without the sample predictions (the manifest and reports carry figures only)."""
    return {k: v for k, v in (scores or {}).items() if k not in ("samples", "retention_samples")}


def retention_key() -> dict:
    """What the retention figures depend on besides the model: the shipped set and how it is asked."""
    from toolchain.runtime import retention as rt_retention

    return {"set": sha256_file(RETENTION_SET), "system": rt_retention.SYSTEM,
            "max_new_tokens": rt_retention.MAX_NEW_TOKENS}


def finetune_inputs(src: Resolved, rec: Recipe, rec_file: Path, launch: Launch) -> dict:
    """A decoder fine-tune's stage key inputs, the same for `edge --recipe R` and `edge --adapters R,...` (so either
    run takes the other's fine-tune): the weights and data by content, the training settings, the replay data by
    content (base weights, prompts, settings: the answers are greedy), and the retention set."""
    from toolchain.stages.finetune import replay

    trained = rec.model_dump(include={"data", "method", "train", "metric"})
    trained["method"].pop("merge_into")  # a merge setting: changes the merged stage, not the fine-tune
    ft_in = {"model": src.card.name, **_inputs(src, rec, rec_file), "recipe": trained,
             "replay": replay.key(src, rec, rec_file), "retention": retention_key()}
    if launch.launcher != "none":
        ft_in["launch"] = launch.model_dump()
    return ft_in


def prepare(src: Resolved, rec: Recipe, rec_file: Path, out: Path = Path("artifacts"), exporter: Optional[str] = None,
            force: bool = False, launch: Launch = Launch(), overrides: tuple = ()) -> Run:
    """finetune -> merge -> export (fp32) -> reference, each reused when its inputs are unchanged."""
    from toolchain.stages.export.decoder import export
    from toolchain.stages.finetune.decoder import GREEDY_FILE, finetune
    from toolchain.stages.merge import merge
    from toolchain.hf.models import is_large, weights_bytes
    from toolchain.stages.reference import reference, reference_torch

    if rec.task == "ner":
        raise ToolchainError(f"recipe '{rec.name}' labels tokens and runs on an encoder; model '{src.card.name}' is a "
                             f"decoder. Use an encoder card (--model minilm-l6) or leave --model out")
    check_data(rec, rec_file, "decoder")
    root = Path(out) / f"{src.card.name}-{rec.name}"
    st = Stages(root, force)
    inputs = _inputs(src, rec, rec_file)
    ft = st.run("finetune", finetune_inputs(src, rec, rec_file, launch),
                lambda o: finetune(src, rec, rec_file, o, launch=launch),
                borrow=Path(out) / f"{src.card.name}-adapters" / "stages" / f"finetune-{rec.name}")
    merge_into = rec.method.merge_into if rec.method.type == "qlora" else None
    mg = st.run("merged", {"finetune": ft.key, "merge_into": merge_into},
                lambda o: merge(src, ft.out, o, merge_into=merge_into))
    exporter = exporter or src.card.exporter
    if is_large(src.path):  # no fp32 copy: torch reference, cpu-int4 built as quantized
        ex = None
        console.print(f"[dim]{src.card.name}: {weights_bytes(src.path) / 1e9:.1f} GB of weights; no fp32 ONNX export "
                      "(its reference comes from the merged torch model)[/dim]")
        rf = st.run("reference-torch", {"merged": mg.key, "recipe": rec.model_dump(include={"data", "metric"}),
                                        "retention": retention_key()},
                    lambda o: reference_torch(mg.out, rec, rec_file, o))
        exporter = "genai"
    else:
        ex = st.run(f"export-{exporter}", {"merged": mg.key, "exporter": exporter},
                    lambda o: export(mg.out, o, exporter=exporter, trust_remote_code=src.trust_remote_code))
        if ex.summary.get("fallback_reason"):  # genai asked for, the builder would get this model wrong: optimum ran
            console.print(f"[yellow]export: {ex.summary['fallback_reason']}[/yellow]")
        exporter = ex.summary.get("exporter", exporter)
        rf = st.run("reference", {"export": ex.key, "recipe": rec.model_dump(include={"data", "metric"}),
                                  "retention": retention_key(), "tokens": "tuned torch greedy"},
                    lambda o: reference(ex.out, mg.out, rec, rec_file, o, greedy=ft.out / GREEDY_FILE))
    figures = {"torch_base": _scores(ft.summary.get("base")), "torch_tuned": _scores(ft.summary.get("tuned")),
               "onnx_fp32": rf.summary}
    training = {"method": ft.summary.get("method", rec.method.type), **(ft.summary.get("train") or {})}
    return Run(st=st, root=root, src=src, recipe=rec, rec_file=rec_file, exporter=exporter, inputs=inputs,
               finetune_key=ft.key, merged=mg.out, merged_key=mg.key, export=ex and ex.out, export_key=ex and ex.key,
               reference_dir=rf.out, reference_key=rf.key, reference=figures, training=training,
               base_lineage=list(st.lineage), overrides=tuple(overrides))


def build_target(r: Run, target: str, spec: Optional[QuantizeSpec] = None, name: Optional[str] = None,
                 out: Optional[Path] = None) -> Path:
    """Quantize (or build) and package one target (or, with spec/name/out, one variant of cpu-int4 or cpu-int8) from
    the run's stages; returns the artifact folder."""
    from toolchain.stages.package import VERSION as PACKAGE_VERSION
    from toolchain.stages.package import package, package_gguf

    t = targets.get(target)
    name = name or target
    if r.export is None and t["built_by"] not in ("builder", "llama.cpp"):  # a large model: no fp32 ONNX export
        from toolchain.hf.models import weights_bytes
        from toolchain.stages.quantize.builder import build_large_int4
        from toolchain.stages.quantize.nbits import spec_for

        if target != "cpu-int4":
            raise ToolchainError(f"target '{target}' quantizes an fp32 ONNX export, which {r.src.card.name} "
                                 f"({weights_bytes(r.merged) / 1e9:.1f} GB of weights) does not get here; build "
                                 "cpu-int4, a builder target (cuda-int4, dml-int4, webgpu-int4) or gguf-q4_k_m")
        spec = spec_for(target, spec or r.recipe.quantize)
        q = r.st.run(f"build-{name}", {"merged": r.merged_key, "target": target, "spec": spec.model_dump(),
                                       "as_built": True},
                     lambda o: build_large_int4(r.merged, o, spec, r.src.trust_remote_code))
        exporter = "onnxruntime-genai builder (int4 as built)"
    elif t["built_by"] == "builder":
        from toolchain.stages.quantize.builder import BUILDER_OPTIONS, build

        q = r.st.run(f"build-{name}", {"merged": r.merged_key, "target": target,
                                       "options": BUILDER_OPTIONS[t["precision"]]},
                     lambda o: build(r.merged, target, o, r.src.trust_remote_code))
        exporter = "onnxruntime-genai builder"
        t["provider_options"] = {k: v for e in q.summary["genai_provider_options"] for k, v in e.get(t["provider"], {}).items()}
    elif t["built_by"] == "llama.cpp":  # a GGUF from the merged folder; no ONNX involved
        from toolchain.stages.quantize import gguf

        q = r.st.run(f"build-{name}", {"merged": r.merged_key, "target": target, "llama_cpp_python": gguf.LLAMA_CPP_PYTHON},
                     lambda o: gguf.build(r.merged, target, o))
        exporter = gguf.EXPORTER
    elif t["built_by"] == "qdq":
        from toolchain.stages.quantize import qdq

        calib = {"export": r.export_key, "target": target, "data": r.inputs["data"], "samples": qdq.CALIB_SAMPLES,
                 "types": [qdq.ACTIVATIONS, qdq.WEIGHTS, qdq.PER_CHANNEL_MATMUL], "float": qdq.EXCLUDE}
        q = r.st.run(f"quantize-{name}", calib, lambda o: qdq.quantize_qdq(
            r.export, qdq.calibration_seqs(r.merged, r.recipe, r.rec_file), o))
        exporter = r.exporter
    else:
        from toolchain.stages.quantize.nbits import quantize, spec_for

        spec = spec_for(target, spec or r.recipe.quantize)
        q = r.st.run(f"quantize-{name}", {"export": r.export_key, "target": target, "spec": spec.model_dump()},
                     lambda o: quantize(r.export, target, o, spec))
        exporter = r.exporter
    desc = {**t, "name": name, "exporter": exporter, "quantize": q.summary}
    if name != target:
        desc["variant_of"] = target
    manifest = Manifest(model_card=r.src.card.model_dump(), recipe=r.recipe.model_dump(), target=desc,
                        versions={}, inputs=r.inputs, training=r.training, reference=r.reference,
                        lineage=r.base_lineage + [r.st.lineage[-1]],  # the shared stages and this target's own
                        overrides=list(r.overrides) or None)
    # the manifest carries the whole recipe (its gates too): a changed gate repackages, and auto re-validates
    pkg_in = {"quantize": q.key, "reference": r.reference_key, "finetune": r.finetune_key, "recipe": r.recipe.model_dump(),
              "overrides": list(r.overrides), "layout": PACKAGE_VERSION}  # the same recipe reached by other overrides: the manifest says which
    if t.get("session_options"):  # written into genai_config.json: a changed default repackages
        pkg_in["session_options"] = t["session_options"]
    pack = package_gguf if t["built_by"] == "llama.cpp" else package
    art = r.st.run(name if out is None else f"artifact-{name}", pkg_in, out=out or r.root / name, fn=lambda o: {
        "path": str(pack(q.out, r.reference_dir / EVAL_FILE, o, manifest))})
    return art.out


def headline(report: dict, reference: dict, metric: str, fp32_size_mb: float, st: Stages) -> dict:
    """The figures `toolchain edge` prints, for a decoder or an encoder artifact: size against fp32, speed, the
    task metric for base torch, tuned torch, fp32 ONNX and the artifact, which stages this run reused, and what each
    stage cost (wall seconds, peak RSS; validate's are its own process's)."""
    stages_reused = dict(st.reused)
    cost = {**st.cost, "validate": {"reused": False, "seconds": report.get("seconds"),
                                    "peak_rss_mb": report.get("measured", {}).get("peak_rss_mb")}}
    m, fp32 = report["measured"], reference["onnx_fp32"]
    h = {"artifact": report["artifact"], "status": report["status"], "size_mb": m["size_mb"],
         "fp32_size_mb": fp32_size_mb, "metric": metric, "base_torch": reference["torch_base"].get(metric),
         "tuned_torch": reference["torch_tuned"].get(metric), "onnx_fp32": fp32.get(metric),
         "artifact_metric": m.get(metric), "stages_reused": stages_reused, "stages": cost}
    if report.get("kind") == "encoder":
        return {**h, "kind": "encoder", "latency_ms_p50": m["latency_ms_p50"], "latency_ms_p95": m["latency_ms_p95"]}
    tuned = reference["torch_tuned"]
    if "retention" in m:  # the general set: what the adaptation cost outside the task, beside its gain
        h.update(retention_base_torch=reference["torch_base"].get("retention"), retention_tuned_torch=tuned.get("retention"),
                 retention_onnx_fp32=fp32.get("retention"), retention_artifact=m["retention"],
                 drift_top1_agreement=tuned.get("drift_top1_agreement"), drift_mean_kl=tuned.get("drift_mean_kl"))
    return {**h, "decode_tok_s": m.get("decode_tok_s_p50"),
            "delta_perplexity_vs_fp32_pct": 100 * (m["perplexity"] / fp32["perplexity"] - 1) if "perplexity" in m else None}


def validate_artifact(r: Run, art: Path) -> dict:
    """Validate in a fresh process (which writes report.json, report.md and the model card, as on a device), add
    the headline figures."""
    from toolchain.hf.models import config_dtype, weights_bytes

    console.print(f"[bold]validate[/bold] {art}")
    report = validate_in_own_process(art)
    fp32_size = (sum(p.stat().st_size for p in r.export.glob("model.onnx*")) / 1e6 if r.export else
                 weights_bytes(r.merged) * 4 / config_dtype(r.merged).itemsize / 1e6)  # what an fp32 copy would take
    report["headline"] = headline(report, r.reference, r.recipe.metric.name, fp32_size, r.st)
    return report


def choose_target(r: Run) -> dict:
    """`--target auto`: build every candidate variant (auto.py), validate each, pick by auto.choose."""
    metric = r.recipe.metric.name
    folder = r.root / "auto"
    cands = []
    for name, base, change in auto_mod.candidates():
        spec = r.recipe.quantize.model_copy(update=change) if change else None
        art = build_target(r, base, spec=spec, name=name, out=folder / name)
        rep = None if r.st.force else auto_mod.cached_report(art)
        if rep:
            console.print(f"[dim]{name}: artifact unchanged, reusing its report[/dim]")
        else:
            rep = validate_artifact(r, art)
        cands.append(auto_mod.summarize(name, rep, metric))
    out = auto_mod.result(cands, r.recipe, r.reference, folder)
    (folder / "auto_report.json").write_text(json.dumps(out, indent=2))
    report_mod.frontier_plot(out, folder / "frontier.png")
    (folder / "auto_report.md").write_text(report_mod.auto_markdown(out))
    return out


def edge_encoder(src: Resolved, rec: Recipe, rec_file: Path, target: str, out: Path, force: bool,
                 overrides: tuple = ()) -> dict:
    """The same chain for an encoder recipe (classify-encoder, ner): Optimum export, int8, no GenAI folder."""
    from toolchain.hf.encoder import TASKS
    from toolchain.runtime import encoder as rt
    from toolchain.stages.export.encoder import export
    from toolchain.stages.finetune.encoder import finetune
    from toolchain.stages.package import package_encoder, versions
    from toolchain.stages.quantize.dynamic import SETTINGS as DYNAMIC_SETTINGS, quantize
    from toolchain.stages.reference import reference_encoder

    if rec.task not in TASKS:
        raise ToolchainError(f"recipe '{rec.name}': task '{rec.task}' has no encoder path; encoder recipes use task "
                             f"{' or '.join(TASKS)} (or pick a decoder model)")
    t = targets.get(target, kind="encoder")
    if not rec.data.eval:
        raise ToolchainError(f"{rec_file}: key 'data.eval': encoder recipes need a held-out file (with --data, "
                             "pass --eval-data too)")
    check_data(rec, rec_file, "encoder")
    root = Path(out) / f"{src.card.name}-{rec.name}"
    st = Stages(root, force)
    inputs = _inputs(src, rec, rec_file)
    ft_in = {"model": src.card.name, **inputs, "recipe": rec.model_dump(include={"data", "method", "train", "metric"})}
    ft = st.run("finetune", ft_in, lambda o: finetune(src, rec, rec_file, o))
    held = rt.read_rows(rec_file.parent / rec.data.eval, rec.task)[: rec.metric.eval_limit]
    ex = st.run("export-optimum", {"finetune": ft.key}, lambda o: export(
        ft.out / "model", rec.task, o, held[:16], rec.data.max_length))
    rf = st.run("reference", {"export": ex.key, "metric": rec.metric.model_dump()}, lambda o: reference_encoder(
        ex.out, ft.out / "model", rec, held, ft.summary["labels"], o))
    q = st.run(f"quantize-{target}", {"export": ex.key, "target": target, "settings": DYNAMIC_SETTINGS},
               lambda o: quantize(ex.out, target, o))
    figures = {"torch_base": _scores(ft.summary.get("base")), "torch_tuned": _scores(ft.summary.get("tuned")),
               "onnx_fp32": rf.summary}
    manifest = Manifest(model_card=src.card.model_dump(), recipe=rec.model_dump(),
                        target={"name": target, "provider": t["provider"], "precision": t["precision"],
                                "exporter": "optimum", "quantize": q.summary},
                        encoder={"task": rec.task, "labels": ft.summary["labels"], "max_length": rec.data.max_length},
                        versions=versions(), inputs=inputs, lineage=st.lineage, reference=figures,
                        overrides=list(overrides) or None)
    art = st.run(target, {"quantize": q.key, "reference": rf.key, "finetune": ft.key, "gates": rec.gates.model_dump(),
                          "overrides": list(overrides)},
                 out=root / target, fn=lambda o: {"path": str(package_encoder(q.out, ft.out / "model", held, o, manifest))})
    report = validate_in_own_process(art.out)  # it writes the reports, as on a device
    report["headline"] = headline(report, figures, rec.metric.name, (ex.out / rt.MODEL).stat().st_size / 1e6, st)
    return report


def edge(model: Optional[str], recipe: str, target: Optional[str] = None, out: Path = Path("artifacts"),
         exporter: Optional[str] = None, max_steps: Optional[int] = None, model_path: Optional[str] = None,
         trust_remote_code: bool = False, force: bool = False, launch: Launch = Launch(),
         method: Optional[str] = None, data=None, eval_data=None, sets: tuple = (), fit_check: bool = True) -> dict:
    """Run every stage for one model, recipe and target ("auto": choose among candidates, see auto.py); returns the
    validation report plus headline figures. Names are resolved here, once; overrides (max_steps, method, data:
    train on your own JSONL, eval_data: score on it, sets: KEY=VALUE for any recipe key) are applied by
    open_recipe, and the manifest records them. A decoder run that will not fit this machine's RAM or disk
    (config/fit.py) stops before any stage runs, unless fit_check is False."""
    loaded = open_recipe(recipe, max_steps=max_steps, method=method, data=data, eval_data=eval_data, sets=sets)
    rec, rec_file = loaded.recipe, loaded.file
    if loaded.note:
        console.print(f"note: {loaded.note}")  # the engine's console writes to stderr
    target = target or rec.target or "cpu-int4"
    src = resolve(model or rec.model, model_path, trust_remote_code)  # fails fast, before any work
    if src.card.kind == "encoder":
        return edge_encoder(src, rec, rec_file, target, Path(out), force, loaded.overrides)
    if target != "auto" and targets.get(target)["built_by"] == "llama.cpp":  # an unknown target fails before any work
        from toolchain.stages.quantize.gguf import check_buildable

        check_buildable(target)  # llama.cpp's converter fetched, its quantizer found where the target needs it
    if fit_check:
        needs = check_fit(src.path, rec, target, Path(out), launch)
        top = max(needs, key=lambda n: n.ram)
        console.print(f"[dim]fit check: peak RAM about {top.ram / GB:.1f} GB ({top.stage}), disk about "
                      f"{sum(n.disk for n in needs) / GB:.1f} GB: estimates, config/fit.py[/dim]")
    r = prepare(src, rec, rec_file, out, exporter, force, launch, loaded.overrides)
    if target == "auto":
        return choose_target(r)
    return validate_artifact(r, build_target(r, target))
