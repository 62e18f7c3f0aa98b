"""The build-host commands: the whole chain (edge) and each stage on its own (finetune, merge, export, quantize)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolchain.cli.common import (console, gates_exit, launch_opts, launch_spec, model_opt, path_opt, print_scores,
                                  trust_opt)


@click.command()
@model_opt
@click.option("--recipe", required=True, help="A recipe name (toolchain recipes) or a path to a recipe YAML.")
@click.option("--data", type=click.Path(), default=None, help="Train on this JSONL instead of the recipe's data.")
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--no-eval", is_flag=True, help="Skip the base/tuned held-out scores.")
@launch_opts
@path_opt
@trust_opt
def finetune(model, recipe, data, max_steps, out, no_eval, method, launcher, nproc, zero, nnodes, node_rank,
             rdzv_endpoint, model_path, trust_remote_code):
    """Train by the recipe's method (LoRA, QLoRA, DoRA, rsLoRA, full); report base vs tuned held-out metric.

    A run interrupted after a checkpoint resumes from it when started again with the same inputs."""
    from toolchain.config.catalog import load_recipe
    from toolchain.config.sources import resolve
    from toolchain.stages.finetune.decoder import finetune as run

    rec, rec_file = load_recipe(recipe, max_steps=max_steps, method=method)
    src = resolve(model, model_path, trust_remote_code)
    res = run(src, rec, rec_file, Path(out), data=Path(data) if data else None, evaluate=not no_eval,
              launch=launch_spec(launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint))
    t = res["train"]
    console.print(f"[bold]{'model' if res['method'] == 'full' else 'adapter'} written to {out}[/bold]  ({t['steps']} "
                  f"steps, {t['ranks']} rank(s), {t['precision']}, {t['seconds']} s, {t['tokens_per_s']} tok/s, "
                  f"final loss {t['final_loss']})")
    print_scores(res)


@click.command()
@model_opt
@click.option("--adapter", required=True, type=click.Path(), help="The folder `toolchain finetune` wrote.")
@click.option("--out", required=True, type=click.Path(), help="Output HF folder (written atomically).")
@click.option("--merge-into", type=click.Choice(["base", "dequantized"]), default=None,
              help="QLoRA: merge into the fp32 base, or into the NF4 base dequantized to fp32 (default: the recipe's "
                   "method.merge_into).")
@path_opt
@trust_opt
def merge(model, adapter, out, merge_into, model_path, trust_remote_code):
    """Merge a LoRA adapter into the full-precision base; fail if logits move by more than 1e-3."""
    from toolchain.config.sources import resolve
    from toolchain.stages.merge import merge as run

    rep = run(resolve(model, model_path, trust_remote_code), Path(adapter), Path(out), merge_into=merge_into)
    console.print(f"[bold]merged model written to {out}[/bold]  max |logit diff| vs base+adapter: "
                  f"{rep['max_abs_logit_diff']:.2e} (limit {rep['tolerance']:.0e})")


@click.command()
@click.option("--model", default=None, help="A model card name or local folder (default: the recipe's model).")
@click.option("--recipe", default="chat-lora", show_default=True)
@click.option("--target", default=None,
              help="A target from `toolchain targets`, or auto: the smallest, then fastest, variant meeting every gate "
                   "(default: the recipe's `target`, else cpu-int4).")
@click.option("--exporter", type=click.Choice(["genai", "optimum"]), default=None, help="Default: the model card's.")
@click.option("--out", default="artifacts", show_default=True, type=click.Path())
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@click.option("--force", is_flag=True, help="Redo every stage even when its inputs are unchanged.")
@click.option("--adapters", default=None, metavar="RECIPE,RECIPE",
              help="One base, one run-time LoRA adapter per recipe (instead of --recipe): "
                   "artifacts/<model>-adapters/<target>/.")
@click.option("--adapter-precision", type=click.Choice(["fp32", "fp16"]), default=None,
              help="With --adapters: the adapters' weights (the base's LoRA inputs) in fp32 or fp16 (default: fp32 on "
                   "CPU targets; CUDA and WebGPU take fp16 only).")
@launch_opts
@path_opt
@trust_opt
def edge(model, recipe, target, exporter, out, max_steps, force, adapters, adapter_precision, method, launcher, nproc,
         zero, nnodes, node_rank, rdzv_endpoint, model_path, trust_remote_code):
    """The whole chain: finetune, merge, export, quantize, package, validate."""
    from toolchain.pipeline import edge as run

    if adapters:
        return edge_adapters(model, adapters, target, exporter, out, max_steps, force, adapter_precision, method,
                             model_path, trust_remote_code,
                             launch_spec(launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint))
    rep = run(model, recipe, target=target, out=Path(out), exporter=exporter, max_steps=max_steps,
              model_path=model_path, trust_remote_code=trust_remote_code, force=force, method=method,
              launch=launch_spec(launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint))
    if target == "auto":
        return auto_exit(rep)
    h = rep["headline"]
    console.print(f"[bold green]artifact:[/bold green] {h['artifact']}  (report: {h['artifact']}/report.md)")
    if h.get("kind") == "encoder":
        console.print(f"  latency per sequence p50 {h['latency_ms_p50']:.2f} ms, p95 {h['latency_ms_p95']:.2f} ms   "
                      f"size {h['size_mb']:.1f} MB vs fp32 {h['fp32_size_mb']:.1f} MB")
        console.print(f"  {h['metric']}: base torch {h['base_torch']:.3f}   tuned torch {h['tuned_torch']:.3f}   "
                      f"fp32 ONNX {h['onnx_fp32']:.3f}   {rep['target']} {h['artifact_metric']:.3f}")
        return gates_exit(rep)
    if not rep["validated"]:
        console.print(f"  size {h['size_mb']:.1f} MB vs fp32 {h['fp32_size_mb']:.1f} MB")
        return gates_exit(rep)
    console.print(f"  decode {h['decode_tok_s']:.1f} tok/s   size {h['size_mb']:.1f} MB vs fp32 {h['fp32_size_mb']:.1f} MB "
                  f"({h['fp32_size_mb'] / h['size_mb']:.1f}x smaller)   Δperplexity vs fp32 {h['delta_perplexity_vs_fp32_pct']:+.2f}%")
    console.print(f"  {h['metric']}: base torch {h['base_torch']:.3f}   tuned torch {h['tuned_torch']:.3f}   "
                  f"{rep['target']} {h['artifact_metric']:.3f}")
    gates_exit(rep)


def edge_adapters(model, adapters, target, exporter, out, max_steps, force, adapter_precision, method, model_path,
                  trust_remote_code, launch) -> None:
    """`edge --adapters`: pipeline_adapters.edge_adapters, its headline, the gates' exit code."""
    from toolchain.cli.adapters import print_headline
    from toolchain.pipeline_adapters import edge_adapters as run
    from toolchain.runtime.errors import ToolchainError

    if exporter == "optimum":
        raise ToolchainError("--adapters: the shared base is built by the onnxruntime-genai builder; leave out "
                             "--exporter optimum")
    print_headline(run(model, [a.strip() for a in adapters.split(",") if a.strip()], target=target or "cpu-int4",
                       out=Path(out), max_steps=max_steps, model_path=model_path, trust_remote_code=trust_remote_code,
                       force=force, adapter_dtype=adapter_precision, launch=launch, method=method))


def auto_exit(rep: dict) -> None:
    m = rep["metric"]
    rejected = {r["name"]: r["why"] for r in rep["rejected"]}
    for c in sorted(rep["candidates"], key=lambda c: c["size_mb"] or 0):
        res = "[green]PICK[/green]" if c["name"] == rep["pick"] else (f"[red]rejected[/red]: {rejected[c['name']]}"
                                                                     if c["name"] in rejected else "meets every gate")
        console.print(f"  {c['name']:24s} {c['size_mb']:7.1f} MB  {c['decode_tok_s'] or 0:6.1f} tok/s  "
                      f"{m} {c.get(m) if c.get(m) is not None else float('nan'):.3f}  {res}")
    console.print(f"[bold]auto:[/bold] {rep['reason']}")
    if rep["pick"]:
        console.print(f"[bold green]artifact:[/bold green] {rep['artifact']}  (report: {Path(rep['artifact']).parent}/auto_report.md)")
    else:
        click.echo("error: no variant meets every gate of the recipe", err=True)
        sys.exit(1)


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A merged HF folder.")
@click.option("--out", required=True, type=click.Path())
@click.option("--exporter", type=click.Choice(["genai", "optimum"]), default="genai", show_default=True)
def export(model_dir, out, exporter):
    """Export a merged HF folder to an onnxruntime-genai fp32 folder, checking parity with torch."""
    from toolchain.stages.export.decoder import export as run

    rep = run(Path(model_dir), Path(out), exporter=exporter)
    console.print(f"[bold]exported to {out}[/bold]  {json.dumps({k: v for k, v in rep.items() if k != 'prompts'})}")


@click.command()
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(), help="The folder `toolchain export` wrote.")
@click.option("--target", required=True, help="cpu-int4, cpu-int8 or cpu-fp32.")
@click.option("--out", required=True, type=click.Path())
@click.option("--recipe", default=None, help="Take the int4 settings from this recipe's `quantize:` section.")
def quantize(onnx_dir, target, out, recipe):
    """Quantize an exported fp32 ONNX folder for a target."""
    from toolchain.config.catalog import load_recipe
    from toolchain.stages.quantize.nbits import quantize as run

    rep = run(Path(onnx_dir), target, Path(out), load_recipe(recipe)[0].quantize if recipe else None)
    console.print(f"[bold]{target} written to {out}[/bold]  ({rep['size_mb']} MB, {rep['seconds']} s)")


