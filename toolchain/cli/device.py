"""The device commands (torch-free, in the `runtime` extra): validate."""
from __future__ import annotations

import json
from pathlib import Path

import click

from toolchain.cli.common import console, err_console, gates_exit


@click.command()
@click.argument("artifact", type=click.Path())
@click.option("--data", type=click.Path(), default=None, help="Score this JSONL instead of the shipped eval split.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--lookup", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Generate the answers with prompt-lookup decoding, drafts of up to K tokens (3 was the best of 3 and 8 "
                   "for SmolLM2 at one thread, bench/results/lookup-*.md); the report adds its speed beside "
                   "plain greedy's.")
@click.option("--adapter", default=None, metavar="NAME",
              help="A multi-adapter artifact: validate this adapter only (default: every adapter and the base alone).")
def validate(artifact, data, as_json, lookup, adapter):
    """Check an artifact on this machine (torch-free): integrity, latency, accuracy, gates.

    Exit 0: gates passed; 1: a gate missed; 2: bad input; 3: built, not validated here (the EP is missing)."""
    from toolchain.cli.adapters import validate_adapters
    from toolchain.runtime.errors import ToolchainError
    from toolchain.runtime.manifest import read

    if read(Path(artifact)).get("adapters"):
        if data:
            raise ToolchainError("--data: a multi-adapter artifact is validated on each adapter's own split")
        return validate_adapters(artifact, adapter, as_json, lookup)
    if adapter:
        raise ToolchainError(f"{artifact}: --adapter takes a multi-adapter artifact (`toolchain edge --adapters`)")
    from toolchain.runtime.metrics import FAMILIES
    from toolchain.runtime.validate import validate as run

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
            return gates_exit(rep)
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
    gates_exit(rep, err_console if as_json else console)


