"""The catalog commands: models, recipes, targets, scenarios."""
from __future__ import annotations

import json
from pathlib import Path

import click

from toolchain.cli.common import table


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models(as_json):
    """List the model cards and whether their weights are on this machine."""
    from toolchain.config.catalog import all_cards
    from toolchain.config.sources import availability

    rows = [{"name": c.name, "architecture": c.architecture, "params": c.params, "kind": c.kind,
             "source": c.source.hub or c.source.path or f"{c.source.package}/{c.source.package_path}",
             "available": availability(c)} for c in all_cards().values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table("model cards (models/*.yaml)", list(rows[0]), rows)


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def recipes(ctx, as_json):
    """List the recipes with their task, method and metric; `recipes cp NAME DEST` copies one to edit."""
    if ctx.invoked_subcommand is not None:
        return
    from toolchain.config.catalog import all_recipes

    rows = [{"name": n, "task": r.task, "method": r.method.type, "metric": r.metric.name, "model": r.model,
             "description": r.description} for n, r in all_recipes().items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table("recipes (recipes/*.yaml)", list(rows[0]), rows)


@recipes.command("cp")
@click.argument("name")
@click.argument("dest", type=click.Path())
@click.option("--copy-data", is_flag=True, help="Copy the data files beside DEST (same relative paths) instead of "
                                                "pointing at them with absolute paths.")
@click.option("--force", is_flag=True, help="Replace DEST if it exists.")
def recipes_cp(name, dest, copy_data, force):
    """Write an editable copy of recipe NAME to DEST (a .yaml file or a folder) that runs as is:
    toolchain edge --recipe DEST."""
    from toolchain.config.catalog import copy_recipe

    out = copy_recipe(name, Path(dest), copy_data=copy_data, force=force)
    how = "its data copied beside it" if copy_data else "data paths absolute"
    click.echo(f"wrote {out} ({how}); edit it, then: toolchain edge --recipe {out}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def targets(as_json):
    """List the targets: EP, precision, which exporter builds it, and whether this host can validate it."""
    from toolchain.config.targets import listing

    rows = listing()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table("targets (toolchain/targets.py)", ["target", "ep", "precision", "built_by", "validate_here", "gates"],
               [{**r, "gates": ", ".join(f"{k} {v}" for k, v in r["gates"].items()) or "the recipe's"} for r in rows])


@click.command()
@click.option("--out", default="artifacts", show_default=True, type=click.Path(), help="Where `edge` wrote the artifacts.")
def scenarios(out):
    """Markdown table of every validated artifact: base / tuned torch / fp32 ONNX / artifact metric, speed, gates."""
    from toolchain.report import scenario_table

    click.echo(scenario_table(Path(out)))


