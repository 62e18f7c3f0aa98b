"""What every command shares: the consoles, how much they say (-q/-v), progress for long steps, the common
options, tables, and how gates turn into exit codes."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.table import Table

# soft wrap: a line is never cut at 80 columns when piped (a terminal or the reader wraps it)
console = Console(soft_wrap=True)  # results
err_console = Console(stderr=True, soft_wrap=True)  # progress and notes (and everything but the JSON, with --json)
VERBOSITY_ENV = "TOOLCHAIN_VERBOSITY"  # 0 quiet, 1 normal, 2 verbose: child processes (edge's validate) inherit it
state = {"level": 1, "debug": False}
model_opt = click.option("--model", required=True, help="A model card name (toolchain models) or a local HF folder.")
path_opt = click.option("--model-path", default=None, help="Local HF folder with the weights of a hub-sourced card.")
trust_opt = click.option("--trust-remote-code", is_flag=True, help="Allow a card that needs its repository's code.")


def launch_opts(f):
    f = click.option("--method", type=click.Choice(["lora", "qlora", "dora", "rslora", "full"]), default=None,
                     help="Override the recipe's method.type.")(f)
    f = click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                     help="Several nodes: node 0's address for torch's c10d rendezvous (the same on every node).")(f)
    f = click.option("--node-rank", type=int, default=0, show_default=True, help="This node's rank, with --nnodes.")(f)
    f = click.option("--nnodes", type=int, default=1, show_default=True,
                     help="Nodes for --launcher deepspeed: run the same command on each.")(f)
    f = click.option("--zero", type=click.Choice(["2", "3"]), default="2", show_default=True,
                     help="ZeRO stage (recipes/deepspeed/zero<N>.json).")(f)
    f = click.option("--nproc", type=int, default=None, help="Ranks per node for --launcher deepspeed (default 2).")(f)
    return click.option("--launcher", type=click.Choice(["none", "deepspeed"]), default="none", show_default=True,
                        help="deepspeed: run the fine-tune in --nproc ranks under DeepSpeed ZeRO, started by "
                             "torch.distributed.run.")(f)


def launch_spec(launcher: str, nproc, zero: str, nnodes: int, node_rank: int, rdzv_endpoint):
    from toolchain.config.schema import Launch

    if (nproc or nnodes > 1) and launcher == "none":
        launcher = "deepspeed"  # --nproc or --nnodes alone means more than one process
    return Launch(launcher=launcher, nproc=nproc or 2, zero=int(zero), nnodes=nnodes, node_rank=node_rank,
                  rdzv_endpoint=rdzv_endpoint)


def configure(quiet: bool, verbose: bool, debug: bool) -> None:
    """The group's -q/-v/--debug. Quiet: results and errors only (progress, notes and stage lines go); verbose:
    every stage and item of a long step. With neither flag, a parent toolchain process's level holds."""
    level = 0 if quiet else 2 if verbose else int(os.environ.get(VERBOSITY_ENV, "1") or 1)
    state.update(level=level, debug=debug)
    os.environ[VERBOSITY_ENV] = str(level)
    err_console.quiet = level == 0
    if level == 0:
        os.environ["TQDM_DISABLE"] = "1"  # the training progress bars
        from toolchain.engine import console as stage_console

        stage_console.quiet = True


def to_json(obj) -> str:
    """JSON with real numbers: NaN and infinities (a figure not measured) become null, which every parser reads."""
    import json
    import math

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2, default=str)


def note(msg: str) -> None:
    """A plain line on stderr, left out with -q."""
    if state["level"] >= 1:
        click.echo(msg, err=True)


def detail(msg: str) -> None:
    """A line for -v only."""
    if state["level"] >= 2:
        err_console.print(msg)


@contextmanager
def progress(label: str):
    """Progress of a long step on stderr: a spinner on a terminal, plain `label: what` lines when stderr is piped
    (a spinner is invisible there), every line with -v, nothing with -q. Yields say(what) and count(what, i, n);
    count prints about ten lines per step when piped, every item with -v."""
    level = state["level"]
    spin = level == 1 and err_console.is_terminal
    if spin:
        with err_console.status(f"{label}: starting") as status:
            yield (lambda what: status.update(f"{label}: {what}"),
                   lambda what, i, n: status.update(f"{label}: {what} {i}/{n}"))
        return

    def say(what: str) -> None:
        if level:
            click.echo(f"{label}: {what}", err=True)

    def count(what: str, i: int, n: int) -> None:
        if level and (level >= 2 or i == n or i % max(1, n // 10) == 0):
            click.echo(f"{label}: {what} {i}/{n}", err=True)

    yield say, count


def table(title: str, cols: list[str], rows: list[dict]) -> None:
    """A rich table on a terminal; piped, a header line and tab-separated rows, never wrapped."""
    if not console.is_terminal:
        for line in [cols] + [[str(r[c]) for c in cols] for r in rows]:
            click.echo("\t".join(line))
        return
    t = Table(title=title)
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    console.print(t)


def print_scores(res: dict) -> None:
    m = res["metric"]
    for who in ("base", "tuned"):
        if who in res:
            s = res[who]
            general = f"   retention {s['retention']:.3f}" if "retention" in s else ""
            moved = (f"   drift from base: top-1 agreement {s['drift_top1_agreement']:.3f}, mean KL "
                     f"{s['drift_mean_kl']:.3f}" if "drift_mean_kl" in s else "")
            console.print(f"  {who:5s}  {m} {s.get(m, float('nan')):.3f}   held-out perplexity {s['perplexity']:.3f}"
                          f"{general}{moved}")



GATE_EXIT = 1  # a gate missed
BAD_INPUT_EXIT = 2  # a ToolchainError or a usage error: the message names the file or key and the fix
NOT_VALIDATED_EXIT = 3  # built, but this host lacks the EP: not a pass (0) and not a missed gate (1)
INTERNAL_EXIT = 4  # an unexpected exception: a bug, not the input
INTERRUPTED_EXIT = 130  # Ctrl-C, as a shell reports SIGINT
EXIT_CODES = """\b
Exit codes:
  0    ok: done, gates passed (validate --data: scored, no gates)
  1    a gate missed (validate, edge), or auto found no variant meeting every gate
  2    bad input: the message names the file or key, and the fix
  3    built, but not validated on this host (its execution provider is missing)
  4    internal error: a bug in the toolchain (--debug shows the traceback)
  130  interrupted (Ctrl-C)"""


def gates_exit(rep: dict, out: Console = console) -> None:
    if not rep["validated"]:
        click.echo(rep["reason"], err=True)
        sys.exit(NOT_VALIDATED_EXIT)
    if rep.get("status") == "scored":
        out.print(f"  scored, no gates ({rep.get('data')})")
        return
    if rep.get("note"):
        out.print(f"  note: {rep['note']}" + "".join(f"; gate {g} not applied" for g in rep.get("gates_not_applicable", [])))
    for g in rep["gates"]:
        out.print(f"  gate {g['gate']}: {g['value']:.3f} (limit {g['limit']}) {'ok' if g['passed'] else '[red]MISSED[/red]'}")
    if not rep["passed"]:
        missed = ", ".join(g["gate"] for g in rep["gates"] if not g["passed"])
        click.echo(f"error: gate(s) missed: {missed}", err=True)
        sys.exit(GATE_EXIT)


