"""The catalog commands: models, recipes, targets, scenarios."""
from __future__ import annotations

import json
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
        click.echo(json.dumps(rows, indent=2))
    else:
        table("model cards (models/*.yaml)", ["name", "architecture", "params", "kind", "source", "available"],
              [{**r, "available": f"yes ({r['why']})" if r["available"] else f"no: {r['why']}"} for r in rows])


@click.command(epilog="""\b
Examples:
  toolchain recipes
  toolchain recipes --json""")
@json_opt
def recipes(as_json):
    """List the recipes with their task, method and metric."""
    from toolchain.config.catalog import all_recipes

    rows = [{"name": n, "task": r.task, "method": r.method.type, "metric": r.metric.name, "model": r.model,
             "description": r.description} for n, r in all_recipes().items()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table("recipes (recipes/*.yaml)", list(rows[0]), rows)


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
        click.echo(json.dumps(rows, indent=2))
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
