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
model_opt = click.option("--model", required=True, help="A model card name (toolchain models) or a local HF folder.")
path_opt = click.option("--model-path", default=None, help="Local HF folder with the weights of a hub-sourced card.")
trust_opt = click.option("--trust-remote-code", is_flag=True, help="Allow a card that needs its repository's code.")


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
@model_opt
@click.option("--recipe", required=True, help="A recipe name (toolchain recipes) or a path to a recipe YAML.")
@click.option("--data", type=click.Path(), default=None, help="Train on this JSONL instead of the recipe's data.")
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (written atomically).")
@click.option("--no-eval", is_flag=True, help="Skip the base/tuned held-out scores.")
@path_opt
@trust_opt
def finetune(model, recipe, data, max_steps, out, no_eval, model_path, trust_remote_code):
    """Train a LoRA adapter; report the held-out metric of the base and the tuned model."""
    from .finetune import finetune as run

    res = run(model, recipe, Path(out), data=data, max_steps=max_steps, model_path=model_path,
              trust_remote_code=trust_remote_code, evaluate=not no_eval)
    console.print(f"[bold]adapter written to {out}/adapter[/bold]  ({res['train']['steps']} steps, "
                  f"{res['train']['seconds']} s, final loss {res['train']['final_loss']})")
    _print_scores(res)


@cli.command()
@model_opt
@click.option("--adapter", required=True, type=click.Path(), help="The folder `toolchain finetune` wrote.")
@click.option("--out", required=True, type=click.Path(), help="Output HF folder (written atomically).")
@path_opt
@trust_opt
def merge(model, adapter, out, model_path, trust_remote_code):
    """Merge a LoRA adapter into the full-precision base; fail if logits move by more than 1e-3."""
    from .merge import merge as run

    rep = run(model, Path(adapter), Path(out), model_path=model_path, trust_remote_code=trust_remote_code)
    console.print(f"[bold]merged model written to {out}[/bold]  max |logit diff| vs base+adapter: "
                  f"{rep['max_abs_logit_diff']:.2e} (limit {rep['tolerance']:.0e})")


@cli.command()
@click.option("--model", default=None, help="A model card name or local folder (default: the recipe's model).")
@click.option("--recipe", default="chat-lora", show_default=True)
@click.option("--out", default="artifacts", show_default=True, type=click.Path())
@click.option("--max-steps", type=int, default=None, help="Override the recipe's train.max_steps.")
@path_opt
@trust_opt
def edge(model, recipe, out, max_steps, model_path, trust_remote_code):
    """The whole chain for one model and recipe (the stages built so far)."""
    from .pipeline import edge as run

    res = run(model, recipe, Path(out), max_steps=max_steps, model_path=model_path, trust_remote_code=trust_remote_code)
    console.print(f"[bold green]done:[/bold green] {res['run']}")
    _print_scores(res["finetune"])
    console.print(f"  merge  max |logit diff| {res['merge']['max_abs_logit_diff']:.2e}")
    console.print(f"  not built yet: {', '.join(res['not_built_yet'])} (no ONNX artifact is produced)")


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ToolchainError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
