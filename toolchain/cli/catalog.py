"""The catalog commands: models, recipes, targets, scenarios."""
from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.common import table, to_json

json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@click.command(epilog="""\b
Examples:
  toolchain models
  toolchain models --json | jq -r '.[] | select(.available) | .name'""")
@json_opt
def models(as_json):
    """List the model cards and whether their weights are on this machine."""
    from toolchain.config.catalog import all_cards
    from toolchain.config.sources import availability

    rows = []
    for c in all_cards().values():
        ok, why = availability(c)
        rows.append({"name": c.name, "architecture": c.architecture, "params": c.params, "kind": c.kind,
                     "source": c.source.hub or c.source.path or f"{c.source.package}/{c.source.package_path}",
                     "available": ok, "why": why})
    if as_json:
        click.echo(to_json(rows))
    else:
        table("model cards (models/*.yaml)", ["name", "architecture", "params", "kind", "source", "available"],
              [{**r, "available": f"yes ({r['why']})" if r["available"] else f"no: {r['why']}"} for r in rows])


@click.group(invoke_without_command=True, epilog="""\b
Examples:
  toolchain recipes
  toolchain recipes --json
  toolchain recipes cp chat-lora my.yaml""")
@json_opt
@click.pass_context
def recipes(ctx, as_json):
    """List the recipes with their task, method and metric; `recipes cp NAME DEST` copies one to edit."""
    if ctx.invoked_subcommand is not None:
        return
    from toolchain.config.catalog import all_recipes

    rows = [{"name": n, "task": r.task, "method": r.method.type, "metric": r.metric.name, "model": r.model,
             "description": r.description} for n, r in all_recipes().items()]
    if as_json:
        click.echo(to_json(rows))
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


def _here(r: dict) -> str:
    if not r["validate_here"]:
        return f"no ({r['why']})"
    return "yes" if r["why"] is None else f"accuracy, on {r['validate_on']} ({r['why'].split(':')[0]})"


@click.command(epilog="""\b
Examples:
  toolchain targets
  toolchain targets --json | jq -r '.[] | select(.validate_here) | .target'""")
@json_opt
def targets(as_json):
    """List the targets: EP, precision, which exporter builds it, and whether this host can validate it."""
    from toolchain.config.targets import listing

    rows = listing()
    if as_json:
        click.echo(to_json(rows))
    else:
        table("targets (toolchain/config/targets.py)", ["target", "ep", "precision", "built_by", "validate_here", "gates"],
              [{**r, "validate_here": _here(r),
                "gates": ", ".join(f"{k} {v}" for k, v in r["gates"].items()) or "the recipe's"} for r in rows])


@click.command(epilog="""\b
Examples:
  toolchain scenarios > scenarios.md
  toolchain scenarios --out artifacts --json""")
@click.option("--out", default="artifacts", show_default=True, type=click.Path(), help="Where `edge` wrote the artifacts.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (numbers, null where not measured).")
def scenarios(out, as_json):
    """Markdown table of every validated artifact: base / tuned torch / fp32 ONNX / artifact metric, speed, gates."""
    from toolchain.report import scenario_rows, scenario_table

    rows = scenario_rows(Path(out))
    click.echo(to_json(rows) if as_json else scenario_table(rows))
