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
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

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


def edge(model: Optional[str], recipe: str, target: Optional[str] = None, out: Path = Path("artifacts"),
         exporter: Optional[str] = None, max_steps: Optional[int] = None, model_path: Optional[str] = None,
         trust_remote_code: bool = False, force: bool = False) -> dict:
    """Run every stage for one model, recipe and target; returns the validation report plus headline figures."""
    from .export import export
    from .finetune import finetune
    from .merge import merge
    from .package import package
    from .quantize import TARGETS, quantize
    from .reference import reference
    from .report import write_reports

    rec, rec_file = load_recipe(recipe)
    model = model or rec.model
    src = resolve(model, model_path, trust_remote_code)  # fails fast, before any work
    target = target or rec.target or "cpu-int4"
    if src.card.kind == "encoder":  # classify-encoder, ner: Optimum export, int8, no GenAI folder
        from . import encoder

        return encoder.edge(src, rec, rec_file, target, Path(out), max_steps, force)
    if rec.task == "ner":
        raise ToolchainError(f"recipe '{rec.name}' labels tokens and runs on an encoder; model '{src.card.name}' is a "
                             f"decoder. Use an encoder card (--model minilm-l6) or leave --model out")
    name = src.card.name
    run = Path(out) / f"{name}-{rec.name}"
    st = Stages(run, force)
    weights = sorted(src.path.glob("*.safetensors")) + [src.path / "config.json"]
    data_files = [rec_file.parent / f for f in (rec.data.train, rec.data.eval) if f]
    ft_in = {"model": name, "weights": _files_hash(weights), "recipe": rec.model_dump(include={"data", "method", "train", "metric"}),
             "data": _files_hash(data_files), "max_steps": max_steps}
    ft_dir, ft_key, ft = st.run("finetune", ft_in, lambda o: finetune(model, recipe, o, max_steps=max_steps,
                                model_path=model_path, trust_remote_code=trust_remote_code))
    mg_dir, mg_key, _ = st.run("merged", {"finetune": ft_key}, lambda o: merge(model, ft_dir, o, model_path=model_path,
                               trust_remote_code=trust_remote_code))
    exporter = exporter or src.card.exporter
    ex_dir, ex_key, _ = st.run(f"export-{exporter}", {"merged": mg_key, "exporter": exporter},
                               lambda o: export(mg_dir, o, exporter=exporter, trust_remote_code=trust_remote_code))
    rf_dir, rf_key, fp32 = st.run("reference", {"export": ex_key, "recipe": rec.model_dump(include={"data", "metric"})},
                                  lambda o: reference(ex_dir, mg_dir, rec, rec_file, o))
    q_dir, q_key, q = st.run(f"quantize-{target}", {"export": ex_key, "target": target, "spec": rec.quantize.model_dump()},
                             lambda o: quantize(ex_dir, target, o, rec.quantize))
    reference_figs = {"torch_base": _strip(ft.get("base")), "torch_tuned": _strip(ft.get("tuned")), "onnx_fp32": fp32}
    art, _, _ = st.run(target, {"quantize": q_key, "reference": rf_key, "finetune": ft_key}, out=run / target, fn=lambda o: {
        "path": str(package(q_dir, rf_dir / "eval.jsonl", o, src.card.model_dump(), rec.model_dump(),
                            {"name": target, **TARGETS[target], "exporter": exporter, "quantize": q},
                            st.lineage, reference_figs, {"weights": ft_in["weights"], "data": ft_in["data"]}))})
    console.print(f"[bold]validate[/bold] {art}")
    report = _validate_in_own_process(art)
    write_reports(art, report)
    fp32_size = sum(p.stat().st_size for p in ex_dir.glob("model.onnx*")) / 1e6
    m = report["measured"]
    report["headline"] = {
        "artifact": str(art), "decode_tok_s": m["decode_tok_s_p50"], "size_mb": m["size_mb"], "fp32_size_mb": fp32_size,
        "delta_perplexity_vs_fp32_pct": 100 * (m["perplexity"] / fp32["perplexity"] - 1),
        "metric": rec.metric.name, "base_torch": reference_figs["torch_base"].get(rec.metric.name),
        "tuned_torch": reference_figs["torch_tuned"].get(rec.metric.name), "artifact_metric": m.get(rec.metric.name),
        "onnx_fp32": fp32.get(rec.metric.name),
    }
    return report


def _validate_in_own_process(art: Path) -> dict:
    """`toolchain validate --json` in a fresh process, as on a device: its peak RSS is the runtime's alone, not
    the training process's, and the device path runs exactly as shipped. Exit 1 (a missed gate) still reports."""
    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(art), "--json"], stdout=subprocess.PIPE)
    if r.returncode not in (0, 1):
        raise ToolchainError(f"validation of {art} failed (exit {r.returncode}); run `toolchain validate {art}` to see why")
    return json.loads(r.stdout)


def _strip(scores: Optional[dict]) -> dict:
    return {k: v for k, v in (scores or {}).items() if k != "samples"}
