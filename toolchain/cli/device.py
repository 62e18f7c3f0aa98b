"""The device commands (torch-free, in the `runtime` extra): validate, tune."""
from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.common import console, detail, err_console, gates_exit, progress, to_json
from toolchain.runtime import host, session


@click.command(epilog="""\b
Examples:
  toolchain validate artifacts/smollm2-135m-chat-lora/cpu-int4
  toolchain validate cpu-int4/ --threads 1 --lookup 3
  toolchain validate cpu-int4/ --data my_eval.jsonl --json""")
@click.argument("artifact", type=click.Path())
@click.option("--data", type=click.Path(), default=None, help="Score this JSONL instead of the shipped eval split.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--lookup", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Generate the answers with prompt-lookup decoding, drafts of up to K tokens (3 was the best of 3 and 8 "
                   "for SmolLM2 at one thread, bench/results/lookup-*.md); the report adds its speed beside "
                   "plain greedy's.")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Intra-op threads for this run (default: device_profile.json, else this host's usable cores).")
@click.option("--report-out", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Also write the report (JSON) here. With --data the only place it is written: the artifact's "
                   "packaged reports stay as they are.")
@click.option("--adapter", default=None, metavar="NAME",
              help="A multi-adapter artifact: validate this adapter only (default: every adapter and the base alone).")
def validate(artifact, data, as_json, lookup, threads, report_out, adapter):
    """Check an artifact on this machine (torch-free): integrity, latency, accuracy, gates; rewrite its report.json
    and report.md (report.png where matplotlib is installed). A multi-adapter artifact: every adapter against its own
    recipe's gates, and the base alone (or --adapter NAME).

    With --data: score your own JSONL with no gates (status "scored"), writing nothing into the artifact.
    Exit 0: gates passed, or scored; 1: a gate missed; 2: bad input; 3: built, not validated here (the EP is
    missing)."""
    from toolchain.cli.adapters import validate_adapters
    from toolchain.runtime.errors import ToolchainError
    from toolchain.runtime.manifest import read

    if read(Path(artifact)).get("adapters"):
        if data:
            raise ToolchainError("--data: a multi-adapter artifact is validated on each adapter's own split")
        return validate_adapters(artifact, adapter, as_json, lookup)
    if adapter:
        raise ToolchainError(f"{artifact}: --adapter takes a multi-adapter artifact (`toolchain edge --adapters`)")
    from toolchain.runtime.validate import validate as run

    with progress("validate") as (say, count):
        rep = run(Path(artifact), Path(data) if data else None, progress=lambda i, n: count("held-out generation", i, n),
                  lookup=lookup, threads=threads, stage=say)
    written = [Path(report_out)] if report_out else []
    if data is None:  # the packaged reports describe the shipped eval split: a --data run leaves them alone
        from toolchain.report import write_reports

        (Path(artifact) / "report.json").write_text(to_json(rep))
        write_reports(Path(artifact), rep)
        written.append(Path(artifact) / "report.json")
    if report_out:
        Path(report_out).parent.mkdir(parents=True, exist_ok=True)
        Path(report_out).write_text(to_json(rep))
    for f in written:
        detail(f"validate: wrote {f}")
    for w in session.warnings(rep.get("session") or {}):
        err_console.print(f"warning: {w}")
    if as_json:
        click.echo(to_json(rep))
    elif rep.get("validated", True):
        _summary(rep)
    gates_exit(rep, err_console if as_json else console)


def _summary(rep: dict) -> None:
    """validate's terminal lines: speed and size, the host and session, the task figures."""
    from toolchain.runtime.metrics import FAMILIES

    m = rep["measured"]
    if rep.get("kind") == "encoder":
        console.print(f"[bold]{rep['target']}[/bold] (encoder): latency per sequence p50 {m['latency_ms_p50']:.2f} ms, "
                      f"p95 {m['latency_ms_p95']:.2f} ms, peak RSS {m['peak_rss_mb']:.0f} MB, size {m['size_mb']:.1f} MB")
        console.print(f"  host: {host.one_line(rep['host'])}")
        console.print("  " + ", ".join(f"{k} {m[k]:.3f}" for k in rep["figures"]))
        return
    console.print(f"[bold]{rep['target']}[/bold] on {rep['provider']}: decode {m['decode_tok_s_p50']:.1f} tok/s, "
                  f"TTFT p50 {m['ttft_ms_p50']:.0f} ms, prefill {m['prefill_tok_s']:.0f} tok/s, "
                  f"peak RSS {m['peak_rss_mb']:.0f} MB, size {m['size_mb']:.1f} MB")
    console.print(f"  host: {host.one_line(rep['host'])}; session: {session.one_line(rep['session'])}")
    figs = ["exact_match", *FAMILIES.get(rep.get("metric"), []), "token_agreement_fp32"]
    console.print(f"  perplexity {m['perplexity']:.3f}" + "".join(
        f", {k} {m[k]:.3f}" for k in dict.fromkeys(figs) if k in m))
    if "answers_decode_tok_s" in m:
        console.print(f"  {rep.get('decoding', 'greedy')}: answers decoded at {m['answers_decode_tok_s']:.1f} tok/s"
                      + (f"; on the latency prompt {m['lookup_decode_tok_s_p50']:.1f} tok/s, "
                         f"{m['lookup_tokens_per_step']:.2f} tokens per forward pass"
                         if "lookup_decode_tok_s_p50" in m else ""))


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        out = sorted({int(x) for x in value.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"'{value}': expected comma-separated thread counts, e.g. 1,2") from None
    if not out or out[0] < 1:
        raise click.BadParameter(f"'{value}': thread counts are 1 or more, e.g. 1,2")
    return out


def _spin_list(ctx, param, value):
    out = sorted({x.strip() for x in value.split(",") if x.strip()})
    if not out or set(out) - {"0", "1"}:
        raise click.BadParameter(f"'{value}': expected 0 (threads sleep when idle), 1 (they spin) or 0,1")
    return out


@click.command(epilog="""\b
Examples:
  toolchain tune cpu-int4/                        1, powers of two and every core; spinning 0 and 1
  toolchain tune cpu-int4/ --threads 1,2 --spinning 1 --runs 3
  toolchain tune cpu-int4/ --json | jq .session_options""")
@click.argument("artifact", type=click.Path())
@click.option("--threads", callback=_int_list, default=None, metavar="N[,N...]",
              help="Intra-op thread counts to try (default: 1, powers of two, and every usable core).")
@click.option("--spinning", callback=_spin_list, default="0,1", show_default=True, metavar="0,1",
              help="Intra-op spinning settings to try: 0 threads sleep when idle, 1 they spin.")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per setting.")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def tune(artifact, threads, spinning, runs, as_json):
    """Measure decode and prefill tok/s for each session setting on this device; write the fastest decode's
    settings to ARTIFACT/device_profile.json, which validate, chat and generate then apply."""
    from toolchain.runtime.session import SPINNING, THREADS
    from toolchain.runtime.tune import default_threads, tune as run

    with progress("tune") as (say, _):
        prof = run(Path(artifact), threads or default_threads(), spinning, runs=runs, progress=say)
    if as_json:
        click.echo(to_json(prof))
        return
    best = prof["session_options"]
    for m in prof["measured"]:
        pick = m[THREADS] == best[THREADS] and m[SPINNING] == best[SPINNING]
        console.print(f"  {m[THREADS]:3d} thread(s)  spinning {m[SPINNING]}  decode {m['decode_tok_s_p50']:8.1f} tok/s  "
                      f"prefill {m['prefill_tok_s']:9.1f} tok/s  TTFT p50 {m['ttft_ms_p50']:7.1f} ms"
                      + ("  [green]PICK[/green]" if pick else ""))
    console.print(f"[bold]{Path(artifact) / 'device_profile.json'}[/bold]: {best[THREADS]} thread(s), spinning "
                  f"{best[SPINNING]}  (host: {host.one_line(prof['host'])})")
