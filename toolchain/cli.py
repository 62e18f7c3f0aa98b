"""`toolchain` command line. Every user error prints one message (no traceback) and exits 2."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from .errors import ToolchainError

console = Console()
err_console = Console(stderr=True)  # progress and notes when stdout carries JSON
model_opt = click.option("--model", required=True, help="A model card name (toolchain models) or a local HF folder.")
path_opt = click.option("--model-path", default=None, help="Local HF folder with the weights of a hub-sourced card.")
trust_opt = click.option("--trust-remote-code", is_flag=True, help="Allow a card that needs its repository's code.")


def launch_opts(f):
    f = click.option("--method", type=click.Choice(["lora", "qlora", "dora", "rslora", "full"]), default=None,
                     help="Override the recipe's method.type.")(f)
    f = click.option("--zero", type=click.Choice(["2", "3"]), default="2", show_default=True,
                     help="ZeRO stage (recipes/deepspeed/zero<N>.json).")(f)
    f = click.option("--nproc", type=int, default=None, help="Ranks for --launcher deepspeed (default 2).")(f)
    return click.option("--launcher", type=click.Choice(["none", "deepspeed"]), default="none", show_default=True,
                        help="deepspeed: run the fine-tune in --nproc ranks under DeepSpeed ZeRO.")(f)


def _launch(launcher: str, nproc, zero: str) -> dict:
    if nproc and launcher == "none":
        launcher = "deepspeed"  # --nproc alone means more than one process
    return {"launcher": launcher, "nproc": nproc or 2, "zero": int(zero)}


def _table(title: str, cols: list[str], rows: list[dict]) -> None:
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    console.print(t)


@click.group()
def cli():
    """Fine-tune, merge, export, quantize and validate language models for the edge."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json):
    """List the model cards and whether their weights are on this machine."""
    from .catalog import all_cards
    from .sources import availability

    rows = [{"name": c.name, "architecture": c.architecture, "params": c.params, "kind": c.kind,
             "source": c.source.hub or c.source.path or f"{c.source.package}/{c.source.package_path}",
             "available": availability(c)} for c in all_cards().values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _table("model cards (models/*.yaml)", list(rows[0]), rows)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def recipes(as_json):
    """List the recipes with their task, method and metric."""
    from .catalog import all_recipes

    rows = [{"name": n, "task": r.task, "method": r.method.type, "metric": r.metric.name, "model": r.model,
             "description": r.description} for n, r in all_recipes().items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _table("recipes (recipes/*.yaml)", list(rows[0]), rows)


def _print_scores(res: dict) -> None:
    m = res["metric"]
    for who in ("base", "tuned"):
        if who in res:
            s = res[who]
            console.print(f"  {who:5s}  {m} {s.get(m, float('nan')):.3f}   held-out perplexity {s['perplexity']:.3f}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets(as_json):
    """List the targets: EP, precision, which exporter builds it, and whether this host can validate it."""
    from .targets import listing

    rows = listing()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _table("targets (toolchain/targets.py)", ["target", "ep", "precision", "built_by", "validate_here", "gates"],
               [{**r, "gates": ", ".join(f"{k} {v}" for k, v in r["gates"].items()) or "the recipe's"} for r in rows])


@cli.command()
@model_opt
@click.option("--recipe", required=True, help="A recipe name (toolchain recipes) or a path to a recipe YAML.")
@click.option("--data", type=click.Path(), default=None, help="Train on this JSONL instead of the recipe's data.")
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--no-eval", is_flag=True, help="Skip the base/tuned held-out scores.")
@launch_opts
@path_opt
@trust_opt
def finetune(model, recipe, data, max_steps, out, no_eval, method, launcher, nproc, zero, model_path, trust_remote_code):
    """Train by the recipe's method (LoRA, QLoRA, DoRA, rsLoRA, full); report base vs tuned held-out metric.

    A run interrupted after a checkpoint resumes from it when started again with the same inputs."""
    from .finetune import finetune as run

    res = run(model, recipe, Path(out), data=data, max_steps=max_steps, model_path=model_path,
              trust_remote_code=trust_remote_code, evaluate=not no_eval, method=method, **_launch(launcher, nproc, zero))
    t = res["train"]
    console.print(f"[bold]{'model' if res['method'] == 'full' else 'adapter'} written to {out}[/bold]  ({t['steps']} "
                  f"steps, {t['ranks']} rank(s), {t['precision']}, {t['seconds']} s, {t['tokens_per_s']} tok/s, "
                  f"final loss {t['final_loss']})")
    _print_scores(res)


@cli.command()
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
    from .merge import merge as run

    rep = run(model, Path(adapter), Path(out), model_path=model_path, trust_remote_code=trust_remote_code,
              merge_into=merge_into)
    console.print(f"[bold]merged model written to {out}[/bold]  max |logit diff| vs base+adapter: "
                  f"{rep['max_abs_logit_diff']:.2e} (limit {rep['tolerance']:.0e})")


@cli.command()
@click.option("--model", default=None, help="A model card name or local folder (default: the recipe's model).")
@click.option("--recipe", default="chat-lora", show_default=True)
@click.option("--target", default=None,
              help="A target from `toolchain targets`, or auto: the smallest, then fastest, variant meeting every gate "
                   "(default: the recipe's `target`, else cpu-int4).")
@click.option("--exporter", type=click.Choice(["genai", "optimum"]), default=None, help="Default: the model card's.")
@click.option("--out", default="artifacts", show_default=True, type=click.Path())
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@click.option("--force", is_flag=True, help="Redo every stage even when its inputs are unchanged.")
@launch_opts
@path_opt
@trust_opt
def edge(model, recipe, target, exporter, out, max_steps, force, method, launcher, nproc, zero, model_path, trust_remote_code):
    """The whole chain: finetune, merge, export, quantize, package, validate."""
    from .pipeline import edge as run

    rep = run(model, recipe, target=target, out=Path(out), exporter=exporter, max_steps=max_steps,
              model_path=model_path, trust_remote_code=trust_remote_code, force=force,
              launch={**_launch(launcher, nproc, zero), **({"method": method} if method else {})})
    if target == "auto":
        return _auto_exit(rep)
    h = rep["headline"]
    console.print(f"[bold green]artifact:[/bold green] {h['artifact']}  (report: {h['artifact']}/report.md)")
    if h.get("kind") == "encoder":
        console.print(f"  latency per sequence p50 {h['latency_ms_p50']:.2f} ms, p95 {h['latency_ms_p95']:.2f} ms   "
                      f"size {h['size_mb']:.1f} MB vs fp32 {h['fp32_size_mb']:.1f} MB")
        console.print(f"  {h['metric']}: base torch {h['base_torch']:.3f}   tuned torch {h['tuned_torch']:.3f}   "
                      f"fp32 ONNX {h['onnx_fp32']:.3f}   {rep['target']} {h['artifact_metric']:.3f}")
        return _gates_exit(rep)
    if not rep["validated"]:
        console.print(f"  size {h['size_mb']:.1f} MB vs fp32 {h['fp32_size_mb']:.1f} MB")
        return _gates_exit(rep)
    console.print(f"  decode {h['decode_tok_s']:.1f} tok/s   size {h['size_mb']:.1f} MB vs fp32 {h['fp32_size_mb']:.1f} MB "
                  f"({h['fp32_size_mb'] / h['size_mb']:.1f}x smaller)   Δperplexity vs fp32 {h['delta_perplexity_vs_fp32_pct']:+.2f}%")
    console.print(f"  {h['metric']}: base torch {h['base_torch']:.3f}   tuned torch {h['tuned_torch']:.3f}   "
                  f"{rep['target']} {h['artifact_metric']:.3f}")
    _gates_exit(rep)


def _auto_exit(rep: dict) -> None:
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


NOT_VALIDATED_EXIT = 3  # built, but this host lacks the EP: not a pass (0) and not a missed gate (1)


def _gates_exit(rep: dict, out: Console = console) -> None:
    if not rep["validated"]:
        click.echo(rep["reason"], err=True)
        sys.exit(NOT_VALIDATED_EXIT)
    if rep.get("note"):
        out.print(f"  note: {rep['note']}" + "".join(f"; gate {g} not applied" for g in rep.get("gates_not_applicable", [])))
    for g in rep["gates"]:
        out.print(f"  gate {g['gate']}: {g['value']:.3f} (limit {g['limit']}) {'ok' if g['passed'] else '[red]MISSED[/red]'}")
    if not rep["passed"]:
        missed = ", ".join(g["gate"] for g in rep["gates"] if not g["passed"])
        click.echo(f"error: gate(s) missed: {missed}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("--data", type=click.Path(), default=None, help="Score this JSONL instead of the shipped eval split.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--lookup", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Generate the answers with prompt-lookup decoding, drafts of up to K tokens (3 was the best of 3 and 8 "
                   "for SmolLM2 at one thread, bench/results/lookup-*.md); the report adds its speed beside "
                   "plain greedy's.")
def validate(artifact, data, as_json, lookup):
    """Check an artifact on this machine (torch-free): integrity, latency, accuracy, gates.

    Exit 0: gates passed; 1: a gate missed; 2: bad input; 3: built, not validated here (the EP is missing)."""
    from .runtime.metrics import FAMILIES
    from .runtime.validate import validate as run

    with err_console.status("validating (latency runs, then held-out accuracy)") as status:
        rep = run(Path(artifact), Path(data) if data else None,
                  progress=lambda i, n: status.update(f"held-out generation {i}/{n}"), lookup=lookup)
    (Path(artifact) / "report.json").write_text(json.dumps(rep, indent=2))
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    elif rep.get("validated", True):
        m = rep["measured"]
        if rep.get("kind") == "encoder":
            console.print(f"[bold]{rep['target']}[/bold] (encoder): latency per sequence p50 {m['latency_ms_p50']:.2f} ms, "
                          f"p95 {m['latency_ms_p95']:.2f} ms, peak RSS {m['peak_rss_mb']:.0f} MB, size {m['size_mb']:.1f} MB")
            console.print("  " + ", ".join(f"{k} {m[k]:.3f}" for k in rep["figures"]))
            return _gates_exit(rep)
        console.print(f"[bold]{rep['target']}[/bold] on {rep['provider']}: decode {m['decode_tok_s_p50']:.1f} tok/s, "
                      f"TTFT p50 {m['ttft_ms_p50']:.0f} ms, prefill {m['prefill_tok_s']:.0f} tok/s, "
                      f"peak RSS {m['peak_rss_mb']:.0f} MB, size {m['size_mb']:.1f} MB")
        figs = ["exact_match", *FAMILIES.get(rep.get("metric"), []), "token_agreement_fp32"]
        console.print(f"  perplexity {m['perplexity']:.3f}" + "".join(
            f", {k} {m[k]:.3f}" for k in dict.fromkeys(figs) if k in m))
        if "answers_decode_tok_s" in m:
            console.print(f"  {rep.get('decoding', 'greedy')}: answers decoded at {m['answers_decode_tok_s']:.1f} tok/s"
                          + (f"; on the latency prompt {m['lookup_decode_tok_s_p50']:.1f} tok/s, "
                             f"{m['lookup_tokens_per_step']:.2f} tokens per forward pass"
                             if "lookup_decode_tok_s_p50" in m else ""))
    _gates_exit(rep, err_console if as_json else console)


@cli.command()
@click.option("--model", "model_dir", required=True, type=click.Path(), help="A merged HF folder.")
@click.option("--out", required=True, type=click.Path())
@click.option("--exporter", type=click.Choice(["genai", "optimum"]), default="genai", show_default=True)
def export(model_dir, out, exporter):
    """Export a merged HF folder to an onnxruntime-genai fp32 folder, checking parity with torch."""
    from .export import export as run

    rep = run(Path(model_dir), Path(out), exporter=exporter)
    console.print(f"[bold]exported to {out}[/bold]  {json.dumps({k: v for k, v in rep.items() if k != 'prompts'})}")


@cli.command()
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(), help="The folder `toolchain export` wrote.")
@click.option("--target", required=True, help="cpu-int4, cpu-int8 or cpu-fp32.")
@click.option("--out", required=True, type=click.Path())
@click.option("--recipe", default=None, help="Take the int4 settings from this recipe's `quantize:` section.")
def quantize(onnx_dir, target, out, recipe):
    """Quantize an exported fp32 ONNX folder for a target."""
    from .catalog import load_recipe
    from .quantize import quantize as run

    rep = run(Path(onnx_dir), target, Path(out), load_recipe(recipe)[0].quantize if recipe else None)
    console.print(f"[bold]{target} written to {out}[/bold]  ({rep['size_mb']} MB, {rep['seconds']} s)")


@cli.command()
@click.option("--out", default="artifacts", show_default=True, type=click.Path(), help="Where `edge` wrote the artifacts.")
def scenarios(out):
    """Markdown table of every validated artifact: base / tuned torch / fp32 ONNX / artifact metric, speed, gates."""
    from .report import scenario_table

    click.echo(scenario_table(Path(out)))


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ToolchainError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
