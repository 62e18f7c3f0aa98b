"""What every command shares: the consoles, the common options, tables, and how gates turn into exit codes."""
from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)  # progress and notes when stdout carries JSON
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


def table(title: str, cols: list[str], rows: list[dict]) -> None:
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
            console.print(f"  {who:5s}  {m} {s.get(m, float('nan')):.3f}   held-out perplexity {s['perplexity']:.3f}")



NOT_VALIDATED_EXIT = 3  # built, but this host lacks the EP: not a pass (0) and not a missed gate (1)


def gates_exit(rep: dict, out: Console = console) -> None:
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


