"""Multi-adapter artifacts on the command line: `toolchain adapters add` (build host) and the validate report of
one base with several adapters (device, torch-free; `toolchain validate` hands such an artifact here)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from toolchain.cli.common import console, err_console, gates_exit, launch_opts, launch_spec, path_opt, trust_opt


def validate_adapters(artifact: str, adapter, as_json: bool, lookup: int) -> None:
    """`toolchain validate` on a multi-adapter artifact: every adapter (or --adapter NAME) against its own recipe's
    gates, the base alone on each recipe's split, the time to switch."""
    from toolchain.runtime.adapters import validate as run

    with err_console.status("validating each adapter (latency, held-out accuracy), the base alone, switching") as s:
        rep = run(Path(artifact), adapter, progress=lambda i, n: s.update(f"held-out generation {i}/{n}"), lookup=lookup)
    (Path(artifact) / "report.json").write_text(json.dumps(rep, indent=2))
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    elif rep["validated"]:
        m = rep["measured"]
        console.print(f"[bold]{rep['target']}[/bold] on {rep['provider']}: base {m['base_mb']:.2f} MB + "
                      f"{len(m['adapters_mb'])} adapters {sum(m['adapters_mb'].values()):.2f} MB, peak RSS "
                      f"{m['peak_rss_mb']:.0f} MB")
        for name, r in sorted(rep["adapters"].items()):
            k, mm, ref = r["metric"], r["measured"], r["reference"]
            console.print(f"  {name:14s} {k} {mm.get(k, float('nan')):.3f} (tuned torch "
                          f"{ref['torch_tuned'].get(k, float('nan')):.3f}, fp32 ONNX {ref['onnx_fp32'].get(k, float('nan')):.3f}; "
                          f"base alone {rep['base'][name].get(k, float('nan')):.3f}, base torch "
                          f"{ref['torch_base'].get(k, float('nan')):.3f})  perplexity {mm['perplexity']:.3f}  "
                          f"decode {mm['decode_tok_s_p50']:.1f} tok/s  {r['status']}")
        sw = rep["switch"]
        console.print(f"  switch: {sw['activate_ms_switched_p50']:.3f} ms to start a request on another adapter "
                      f"(same adapter {sw['activate_ms_same_p50']:.3f} ms); first token {sw['first_token_ms_switched_p50']:.2f} "
                      f"ms after a switch vs {sw['first_token_ms_same_p50']:.2f} ms")
    gates_exit({**rep, "gates": adapter_gates(rep)}, err_console if as_json else console)


def adapter_gates(rep: dict) -> list[dict]:
    """Every adapter's gates, each named after its adapter, as gates_exit prints them."""
    return [{**g, "gate": f"{n}: {g['gate']}"} for n, r in sorted((rep.get("adapters") or {}).items()) for g in r["gates"]]


@click.group()
def adapters():
    """Multi-adapter artifacts: one base, LoRA adapters switched at run time."""


@adapters.command("add")
@click.argument("artifact", type=click.Path())
@click.option("--recipe", required=True, help="The recipe whose adapter to train (a name or a YAML path).")
@click.option("--model", default=None, help="The base (default: the artifact's model card); must hash to its base.")
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@click.option("--force", is_flag=True, help="Redo the recipe's stages even when their inputs are unchanged.")
@launch_opts
@path_opt
@trust_opt
def add(artifact, recipe, model, max_steps, force, method, launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint,
        model_path, trust_remote_code):
    """Train, convert and validate one more adapter for ARTIFACT (from `toolchain edge --adapters`), without
    rebuilding its base; a base with other weights than the artifact's is refused."""
    from toolchain.pipeline_adapters import add_adapter

    rep = add_adapter(Path(artifact), recipe, max_steps=max_steps, model=model, model_path=model_path,
                      trust_remote_code=trust_remote_code, force=force, method=method,
                      launch=launch_spec(launcher, nproc, zero, nnodes, node_rank, rdzv_endpoint))
    print_headline(rep)


def print_headline(rep: dict) -> None:
    h = rep["headline"]
    console.print(f"[bold green]artifact:[/bold green] {h['artifact']}  (report: {h['artifact']}/report.md)")
    console.print(f"  base {h['base_mb']:.2f} MB + {h['adapters']} adapters = {h['size_mb']:.2f} MB "
                  f"(vs about {h['merged_equivalent_mb']:.2f} MB as {h['adapters']} merged artifacts)")
    for name, a in sorted((h.get("per_adapter") or {}).items()):
        f = lambda k: "n/a" if a.get(k) is None else f"{a[k]:.3f}"  # 0.0 is a score, not a missing one
        console.print(f"  {name:14s} {a['metric']}: base torch {f('base_torch')}   tuned torch {f('tuned_torch')}   "
                      f"fp32 ONNX {f('onnx_fp32')}   here {f('artifact')}   base alone {f('base_alone')}   "
                      f"retention {f('retention')} (base torch {f('retention_base_torch')})   "
                      f"{a['adapter_mb']:.2f} MB  {a['status']}")
    if "switch_ms" in h:
        console.print(f"  switching adapters: {h['switch_ms']:.3f} ms p50")
    gates_exit({**rep, "gates": adapter_gates(rep)})
