"""The build-host commands: the whole chain (edge) and each stage on its own (finetune, merge, export, quantize)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolchain.cli.common import (GATE_EXIT, console, err_console, gates_exit, launch_opts, launch_spec, model_opt,
                                  path_opt, print_scores, to_json, trust_opt)

json_opt = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (progress stays on stderr).")


def data_opts(f):
    """--data / --eval-data: the user's own JSONL instead of the recipe's; --set: any recipe key. All applied by
    config.catalog.open_recipe, once."""
    f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Set any recipe key by its dotted path (repeatable), e.g. --set train.lr=5e-4 --set method.r=8 "
                          "--set gates.min_metric_fraction=0.9; VALUE is read as YAML and checked by the recipe "
                          "schema.")(f)
    f = click.option("--eval-data", type=click.Path(), default=None, metavar="EVAL.jsonl",
                     help="Score on this JSONL (default with --data: a held-out split of it, data.eval_fraction "
                          "seeded by train.seed).")(f)
    return click.option("--data", type=click.Path(), default=None, metavar="TRAIN.jsonl",
                        help="Train on this JSONL instead of the recipe's data: chat, prompt/completion or text "
                             "rows; the stage keys hash it, so a changed file retrains.")(f)


def _json(obj) -> None:
    click.echo(to_json(obj))


@click.command(epilog="""\b
Examples:
  toolchain finetune --model smollm2-135m --recipe chat-lora --out runs/adapter
  toolchain finetune --model smollm2-135m --recipe chat-lora --out runs/a --method qlora --max-steps 20
  toolchain finetune --model smollm2-135m --recipe chat-lora --out runs/a --launcher deepspeed --nproc 2""")
@model_opt
@click.option("--recipe", required=True, help="A recipe name (toolchain recipes) or a path to a recipe YAML.")
@data_opts
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--no-eval", is_flag=True, help="Skip the base/tuned held-out scores.")
@launch_opts
@path_opt
@trust_opt
@json_opt
def finetune(model, recipe, data, eval_data, sets, max_steps, out, no_eval, method, launcher, nproc, zero, nnodes,
             node_rank, rdzv_endpoint, model_path, trust_remote_code, as_json):
    """Train by the recipe's method (LoRA, QLoRA, DoRA, rsLoRA, full); report base vs tuned held-out metric.

    A run interrupted after a checkpoint resumes from it when started again with the same inputs."""
    from toolchain.config.catalog import open_recipe
    from toolchain.config.sources import resolve
    from toolchain.stages.finetune.decoder import finetune as run

    loaded = open_recipe(recipe, max_steps=max_steps, method=method, data=data, eval_data=eval_data, sets=sets)
    if loaded.note:
        err_console.print(f"note: {loaded.note}")
    src = resolve(model, model_path, trust_remote_code)
    res = run(src, loaded.recipe, loaded.file, Path(out), evaluate=not no_eval,
              launch=launch_spec(launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint))
    if as_json:
        return _json(res)
    t = res["train"]
    console.print(f"[bold]{'model' if res['method'] == 'full' else 'adapter'} written to {out}[/bold]  ({t['steps']} "
                  f"steps, {t['ranks']} rank(s), {t['precision']}, {t['seconds']} s, {t['tokens_per_s']} tok/s, "
                  f"final loss {t['final_loss']})")
    print_scores(res)


@click.command(epilog="""\b
Examples:
  toolchain merge --model smollm2-135m --adapter runs/adapter --out runs/merged""")
@model_opt
@click.option("--adapter", required=True, type=click.Path(), help="The folder `toolchain finetune` wrote.")
@click.option("--out", required=True, type=click.Path(), help="Output HF folder (written atomically).")
@click.option("--merge-into", type=click.Choice(["base", "dequantized"]), default=None,
              help="QLoRA: merge into the fp32 base, or into the NF4 base dequantized to fp32 (default: the recipe's "
                   "method.merge_into).")
@path_opt
@trust_opt
@json_opt
def merge(model, adapter, out, merge_into, model_path, trust_remote_code, as_json):
    """Merge a LoRA adapter into the full-precision base; fail if logits move by more than 1e-3."""
    from toolchain.config.sources import resolve
    from toolchain.stages.merge import merge as run

    rep = run(resolve(model, model_path, trust_remote_code), Path(adapter), Path(out), merge_into=merge_into)
    if as_json:
        return _json(rep)
    console.print(f"[bold]merged model written to {out}[/bold]  max |logit diff| vs base+adapter: "
                  f"{rep['max_abs_logit_diff']:.2e} (limit {rep['tolerance']:.0e})")


@click.command(epilog="""\b
Examples:
  toolchain edge                                   chat-lora on its model, to artifacts/…/cpu-int4
  toolchain edge --recipe classify --target cpu-int8
  toolchain edge --recipe chat-lora --target auto  the smallest variant that meets every gate
  toolchain -q edge --json > report.json           the report with its headline, for CI""")
@click.option("--model", default=None, help="A model card name or local folder (default: the recipe's model).")
@click.option("--recipe", default="chat-lora", show_default=True)
@click.option("--target", default=None,
              help="A target from `toolchain targets`, or auto: the smallest, then fastest, variant meeting every gate "
                   "(default: the recipe's `target`, else cpu-int4).")
@click.option("--exporter", type=click.Choice(["genai", "optimum"]), default=None, help="Default: the model card's.")
@click.option("--out", default="artifacts", show_default=True, type=click.Path())
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@data_opts
@click.option("--force", is_flag=True, help="Redo every stage even when its inputs are unchanged.")
@click.option("--no-fit-check", is_flag=True,
              help="Skip the pre-flight estimate of each stage's RAM and disk against this machine (config/fit.py).")
@click.option("--adapters", default=None, metavar="RECIPE,RECIPE",
              help="One base, one run-time LoRA adapter per recipe (instead of --recipe): "
                   "artifacts/<model>-adapters/<target>/.")
@click.option("--adapter-precision", type=click.Choice(["fp32", "fp16"]), default=None,
              help="With --adapters: the adapters' weights (the base's LoRA inputs) in fp32 or fp16 (default: fp32 on "
                   "CPU targets; CUDA and WebGPU take fp16 only).")
@launch_opts
@path_opt
@trust_opt
@json_opt
def edge(model, recipe, target, exporter, out, max_steps, data, eval_data, sets, force, no_fit_check, adapters,
         adapter_precision, method, launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint, model_path, trust_remote_code, as_json):
    """The whole chain: finetune, merge, export, quantize, package, validate.

    With --data the recipe trains on your own JSONL (chat, prompt/completion or text rows, runtime/rows.py); --set
    changes any recipe key for this run (the manifest records the overrides). With --adapters, one base and one
    run-time LoRA adapter per recipe."""
    from toolchain.pipeline import edge as run

    if adapters:
        return edge_adapters(model, adapters, target, exporter, out, max_steps, force, adapter_precision, method,
                             model_path, trust_remote_code,
                             launch_spec(launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint))
    rep = run(model, recipe, target=target, out=Path(out), exporter=exporter, max_steps=max_steps,
              model_path=model_path, trust_remote_code=trust_remote_code, force=force, method=method,
              data=data, eval_data=eval_data, sets=sets, fit_check=not no_fit_check,
              launch=launch_spec(launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint))
    if as_json:
        _json(rep)
        if target == "auto":
            if not rep["pick"]:
                click.echo("error: no variant meets every gate of the recipe", err=True)
                sys.exit(GATE_EXIT)
            return
        return gates_exit(rep, err_console)
    if target == "auto":
        return auto_exit(rep)
    h = rep["headline"]
    console.print(f"[bold green]artifact:[/bold green] {h['artifact']}  (report: {h['artifact']}/report.md)")
    console.print("  stages: " + ", ".join(_cost(n, c) for n, c in h.get("stages", {}).items()))
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
    if h.get("retention_artifact") is not None:
        console.print(f"  retention (general questions): base torch {_f(h['retention_base_torch'])}   tuned torch "
                      f"{_f(h['retention_tuned_torch'])}   {rep['target']} {h['retention_artifact']:.3f}   drift from "
                      f"base: top-1 agreement {_f(h['drift_top1_agreement'])}, mean KL {_f(h['drift_mean_kl'])}")
    gates_exit(rep)


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _cost(name: str, c: dict) -> str:
    if c.get("reused"):
        return f"{name} reused"
    rss = f" {c['peak_rss_mb'] / 1024:.1f} GB" if c.get("peak_rss_mb") else ""
    return f"{name} {c.get('seconds') or 0:.0f} s{rss}"


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
        sys.exit(GATE_EXIT)


@click.command(epilog="""\b
Examples:
  toolchain export --model runs/merged --out runs/onnx
  toolchain export --model runs/merged --out runs/onnx-optimum --exporter optimum""")
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A merged HF folder.")
@click.option("--out", required=True, type=click.Path())
@click.option("--exporter", type=click.Choice(["genai", "optimum"]), default="genai", show_default=True)
@json_opt
def export(model_dir, out, exporter, as_json):
    """Export a merged HF folder to an onnxruntime-genai fp32 folder, checking parity with torch."""
    from toolchain.stages.export.decoder import export as run

    rep = run(Path(model_dir), Path(out), exporter=exporter)
    if as_json:
        return _json(rep)
    console.print(f"[bold]exported to {out}[/bold]  {json.dumps({k: v for k, v in rep.items() if k != 'prompts'})}")


@click.command(epilog="""\b
Examples:
  toolchain quantize --onnx runs/onnx --target cpu-int4 --out runs/cpu-int4
  toolchain quantize --onnx runs/onnx --target cpu-int4 --out runs/cpu-int4 --recipe chat-lora""")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(), help="The folder `toolchain export` wrote.")
@click.option("--target", required=True, help="cpu-int4, cpu-int8 or cpu-fp32.")
@click.option("--out", required=True, type=click.Path())
@click.option("--recipe", default=None, help="Take the int4 settings from this recipe's `quantize:` section.")
@json_opt
def quantize(onnx_dir, target, out, recipe, as_json):
    """Quantize an exported fp32 ONNX folder for a target."""
    from toolchain.config.catalog import load_recipe
    from toolchain.stages.quantize.nbits import quantize as run

    rep = run(Path(onnx_dir), target, Path(out), load_recipe(recipe)[0].quantize if recipe else None)
    if as_json:
        return _json(rep)
    console.print(f"[bold]{target} written to {out}[/bold]  ({rep['size_mb']} MB, {rep['seconds']} s)")


