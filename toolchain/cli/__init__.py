"""`toolchain` command line. Every user error prints one message (no traceback) and exits 2.

The commands live by where they run: catalog.py (models, recipes, targets, scenarios), build.py (edge and the
single stages, on a build host with torch), device.py (validate: torch-free, what a device installs).
"""
from __future__ import annotations

import sys

import click

from toolchain.cli import adapters, build, catalog, device
from toolchain.runtime.errors import ToolchainError


@click.group()
def cli():
    """Fine-tune, merge, export, quantize and validate language models for the edge."""


for _cmd in (catalog.models, catalog.recipes, catalog.targets, build.finetune, build.merge, build.edge, device.validate,
             build.export, build.quantize, catalog.scenarios, adapters.adapters):
    cli.add_command(_cmd)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ToolchainError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
