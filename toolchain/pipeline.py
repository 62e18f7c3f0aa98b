"""The mission as code: take a language model to a folder you can copy to a device, with a report you can trust.

    finetune -> merge -> export -> quantize -> package -> validate
    (PEFT)      (HF)     (ONNX)    (int4/8)    (manifest) (ORT: latency, accuracy, gates)

Each stage is one module with one entry function. `edge` runs them for one model, recipe and target, under
artifacts/<model>-<recipe>/: intermediate folders in stages/, the artifact in <target>/. A stage whose inputs are
unchanged is reused (content-hashed key in stages/.keys/); every stage writes atomically, so a run killed
mid-stage resumes at that stage. --force redoes everything.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

from . import targets
from .catalog import load_recipe
from .errors import ToolchainError
from .fsutil import sha256_file
from .sources import resolve

console = Console(stderr=True)


class Stages:
    """Content-hashed stage cache: a stage is reused when its key (hash of its inputs) is the one recorded."""

    def __init__(self, root: Path, force: bool):
        self.root, self.force, self.lineage = root, force, []
        (root / "stages" / ".keys").mkdir(parents=True, exist_ok=True)

    def run(self, name: str, inputs: dict, fn: Callable[[Path], dict], out: Optional[Path] = None) -> tuple[Path, str, dict]:
        out = out or self.root / "stages" / name
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        rec = self.root / "stages" / ".keys" / f"{name}.json"
        if not self.force and out.exists() and rec.is_file() and json.loads(rec.read_text())["key"] == key:
            console.print(f"[dim]{name}: inputs unchanged ({key}), reusing {out}[/dim]")
            summary = json.loads(rec.read_text())["summary"]
        else:
            console.print(f"[bold]{name}[/bold] -> {out}")
            summary = fn(out)
            rec.write_text(json.dumps({"key": key, "inputs": inputs, "summary": summary}, indent=2, default=str))
        self.lineage.append({"stage": name, "key": key, "out": str(out)})
        return out, key, summary


def _files_hash(paths: list[Path]) -> str:
    return hashlib.sha256("".join(sha256_file(p) for p in sorted(paths)).encode()).hexdigest()[:16]


@dataclass
class Run:
    """The shared stages of one model and recipe: everything a target is built from."""
    st: Stages
    root: Path
    card: dict
    recipe: object
    rec_file: Path
    exporter: str
    trust_remote_code: bool
    ft_key: str
    ft_in: dict
    mg_dir: Path
    mg_key: str
    ex_dir: Path
    ex_key: str
    rf_dir: Path
    rf_key: str
    reference: dict
    training: dict
    base_lineage: list


def prepare(model: Optional[str], recipe: str, out: Path = Path("artifacts"), exporter: Optional[str] = None,
            max_steps: Optional[int] = None, model_path: Optional[str] = None, trust_remote_code: bool = False,
            force: bool = False, launch: Optional[dict] = None, src=None) -> Run:
    """finetune -> merge -> export (fp32) -> reference, each reused when its inputs are unchanged. `src`: the
    model already resolved by the caller."""
    from .export import export
    from .finetune import finetune
    from .merge import merge
    from .reference import reference

    rec, rec_file = load_recipe(recipe)
    launch = dict(launch or {})
    if launch.get("method"):
        rec.method.type = launch["method"]  # a --method override shows in the stage keys and the manifest
    model = model or rec.model
    src = src or resolve(model, model_path, trust_remote_code)  # fails fast, before any work
    if rec.task == "ner":
        raise ToolchainError(f"recipe '{rec.name}' labels tokens and runs on an encoder; model '{src.card.name}' is a "
                             f"decoder. Use an encoder card (--model minilm-l6) or leave --model out")
    name = src.card.name
    run = Path(out) / f"{name}-{rec.name}"
    st = Stages(run, force)
    weights = sorted(src.path.glob("*.safetensors")) + [src.path / "config.json"]
    data_files = [rec_file.parent / f for f in (rec.data.train, rec.data.eval) if f]
    trained = rec.model_dump(include={"data", "method", "train", "metric"})
    trained["method"].pop("merge_into")  # a merge setting: changes the merged stage, not the fine-tune
    ft_in = {"model": name, "weights": _files_hash(weights), "recipe": trained,
             "data": _files_hash(data_files), "max_steps": max_steps}
    if launch.get("launcher", "none") != "none":
        ft_in["launch"] = launch
    ft_dir, ft_key, ft = st.run("finetune", ft_in, lambda o: finetune(model, recipe, o, max_steps=max_steps,
                                model_path=model_path, trust_remote_code=trust_remote_code, **launch))
    merge_into = rec.method.merge_into if rec.method.type == "qlora" else None
    mg_dir, mg_key, _ = st.run("merged", {"finetune": ft_key, "merge_into": merge_into}, lambda o: merge(
        model, ft_dir, o, model_path=model_path, trust_remote_code=trust_remote_code, merge_into=merge_into))
    exporter = exporter or src.card.exporter
    ex_dir, ex_key, _ = st.run(f"export-{exporter}", {"merged": mg_key, "exporter": exporter},
                               lambda o: export(mg_dir, o, exporter=exporter, trust_remote_code=trust_remote_code))
    rf_dir, rf_key, fp32 = st.run("reference", {"export": ex_key, "recipe": rec.model_dump(include={"data", "metric"})},
                                  lambda o: reference(ex_dir, mg_dir, rec, rec_file, o))
    reference_figs = {"torch_base": _strip(ft.get("base")), "torch_tuned": _strip(ft.get("tuned")), "onnx_fp32": fp32}
    training = {"method": ft.get("method", rec.method.type), **(ft.get("train") or {})}  # ranks, ZeRO stage, precision
    return Run(st, run, src.card.model_dump(), rec, rec_file, exporter, trust_remote_code, ft_key, ft_in, mg_dir, mg_key,
               ex_dir, ex_key, rf_dir, rf_key, reference_figs, training, list(st.lineage))


def build_target(r: Run, target: str, spec=None, name: Optional[str] = None, out: Optional[Path] = None) -> Path:
    """Build and package one target (or, with spec/name/out, one variant of cpu-int4 or cpu-int8) from the run's
    stages; returns the artifact folder."""
    from .package import package

    t = targets.get(target)
    name = name or target
    if t["built_by"] == "builder":
        from .build import BUILDER_OPTIONS, build

        q_dir, q_key, q = r.st.run(f"build-{name}", {"merged": r.mg_key, "target": target,
                                                     "options": BUILDER_OPTIONS[t["precision"]]},
                                   lambda o: build(r.mg_dir, target, o, r.trust_remote_code))
        exporter = "onnxruntime-genai builder"
        t["provider_options"] = {k: v for e in q["genai_provider_options"] for k, v in e.get(t["provider"], {}).items()}
    elif t["built_by"] == "qdq":
        from . import qdq

        calib = {"export": r.ex_key, "target": target, "data": r.ft_in["data"], "samples": qdq.CALIB_SAMPLES,
                 "types": [qdq.ACTIVATIONS, qdq.WEIGHTS, qdq.PER_CHANNEL_MATMUL], "float": qdq.EXCLUDE}
        q_dir, q_key, q = r.st.run(f"quantize-{name}", calib, lambda o: qdq.quantize_qdq(
            r.ex_dir, qdq.calibration_seqs(r.mg_dir, r.recipe, r.rec_file), o))
        exporter = r.exporter
    else:
        from .quantize import quantize, spec_for

        spec = spec_for(target, spec or r.recipe.quantize)
        q_dir, q_key, q = r.st.run(f"quantize-{name}", {"export": r.ex_key, "target": target, "spec": spec.model_dump()},
                                   lambda o: quantize(r.ex_dir, target, o, spec))
        exporter = r.exporter
    lineage = r.base_lineage + [r.st.lineage[-1]]  # the shared stages and this target's own
    desc = {**t, "name": name, "exporter": exporter, "quantize": q}
    if name != target:
        desc["variant_of"] = target
    # the manifest carries the whole recipe (its gates too): a changed gate repackages, and auto re-validates
    pkg_in = {"quantize": q_key, "reference": r.rf_key, "finetune": r.ft_key, "recipe": r.recipe.model_dump()}
    if t.get("session_options"):  # written into genai_config.json: a changed default repackages
        pkg_in["session_options"] = t["session_options"]
    art, _, _ = r.st.run(name if out is None else f"artifact-{name}", pkg_in, out=out or r.root / name, fn=lambda o: {
        "path": str(package(q_dir, r.rf_dir / "eval.jsonl", o, r.card, r.recipe.model_dump(), desc, lineage,
                            r.reference, {"weights": r.ft_in["weights"], "data": r.ft_in["data"]}, r.training))})
    return art


def validate_artifact(r: Run, art: Path) -> dict:
    """Validate in a fresh process, write the reports, add the headline figures."""
    from .report import write_reports

    console.print(f"[bold]validate[/bold] {art}")
    report = _validate_in_own_process(art)
    write_reports(art, report)
    fp32 = r.reference["onnx_fp32"]
    fp32_size = sum(p.stat().st_size for p in r.ex_dir.glob("model.onnx*")) / 1e6
    m, metric = report["measured"], r.recipe.metric.name
    report["headline"] = {
        "artifact": str(art), "status": report["status"], "size_mb": m["size_mb"], "fp32_size_mb": fp32_size,
        "decode_tok_s": m.get("decode_tok_s_p50"),
        "delta_perplexity_vs_fp32_pct": 100 * (m["perplexity"] / fp32["perplexity"] - 1) if "perplexity" in m else None,
        "metric": metric, "base_torch": r.reference["torch_base"].get(metric),
        "tuned_torch": r.reference["torch_tuned"].get(metric), "artifact_metric": m.get(metric),
        "onnx_fp32": fp32.get(metric),
    }
    return report


def edge(model: Optional[str], recipe: str, target: Optional[str] = None, out: Path = Path("artifacts"),
         exporter: Optional[str] = None, max_steps: Optional[int] = None, model_path: Optional[str] = None,
         trust_remote_code: bool = False, force: bool = False, launch: Optional[dict] = None) -> dict:
    """Run every stage for one model, recipe and target ("auto": choose among candidates, see auto.py); returns the
    validation report plus headline figures."""
    rec, rec_file = load_recipe(recipe)
    target = target or rec.target or "cpu-int4"
    src = resolve(model or rec.model, model_path, trust_remote_code)  # fails fast, before any work
    if src.card.kind == "encoder":  # classify-encoder, ner: Optimum export, int8, no GenAI folder
        from . import encoder

        return encoder.edge(src, rec, rec_file, target, Path(out), max_steps, force)
    if target != "auto":
        targets.get(target)  # an unknown target fails before any work
    r = prepare(model, recipe, out, exporter, max_steps, model_path, trust_remote_code, force, launch, src)
    if target == "auto":
        from .auto import auto

        return auto(r)
    return validate_artifact(r, build_target(r, target))


def _validate_in_own_process(art: Path) -> dict:
    """`toolchain validate --json` in a fresh process, as on a device: its peak RSS is the runtime's alone, not
    the training process's, and the device path runs exactly as shipped. Exit 1 (a missed gate) and 3 (the EP is
    missing here) still report."""
    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(art), "--json"], stdout=subprocess.PIPE)
    if r.returncode not in (0, 1, 3):  # 3: built, not validated here (EP missing)
        raise ToolchainError(f"validation of {art} failed (exit {r.returncode}); run `toolchain validate {art}` to see why")
    return json.loads(r.stdout)


def _strip(scores: Optional[dict]) -> dict:
    return {k: v for k, v in (scores or {}).items() if k != "samples"}
