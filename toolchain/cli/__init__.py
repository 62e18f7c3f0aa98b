"""`toolchain` command line. Every user error prints one message (no traceback) and exits 2; an unexpected one
prints one line and exits 4 (--debug: with the traceback). The exit codes are listed in `toolchain -h`.

The commands live by where they run: catalog.py (models, recipes, targets, scenarios), build.py (edge and the
single stages, on a build host with torch), device.py (validate, tune) and chat.py (chat, generate): torch-free,
what a device installs.
"""
from __future__ import annotations

import sys
import traceback

import click

from toolchain import VERSION
from toolchain.cli import adapters, build, catalog, chat, common, device
from toolchain.runtime.errors import ToolchainError


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=common.EXIT_CODES + """

\b
Examples:
  toolchain models                      the model cards, and whether their weights are here
  toolchain edge --recipe chat-lora     fine-tune, export, quantize, package and validate
  toolchain validate artifacts/smollm2-135m-chat-lora/cpu-int4
  toolchain chat artifacts/smollm2-135m-chat-lora/cpu-int4
  toolchain COMMAND -h                  a command's options and examples""")
@click.version_option(VERSION, "-V", "--version", prog_name="toolchain", message="%(prog)s %(version)s")
@click.option("-q", "--quiet", is_flag=True, help="Only results and errors: no progress, notes or stage lines.")
@click.option("-v", "--verbose", is_flag=True, help="Stage details: every stage and item of a long step.")
@click.option("--debug", is_flag=True, help="On an unexpected error, print its traceback.")
def cli(quiet, verbose, debug):
    """Fine-tune, merge, export, quantize and validate language models for the edge."""
    if quiet and verbose:
        raise click.UsageError("-q and -v contradict each other: pass one")
    common.configure(quiet, verbose, debug)


for _cmd in (catalog.models, catalog.recipes, catalog.targets, build.finetune, build.merge, build.edge, device.validate,
             build.export, build.quantize, catalog.scenarios, device.tune, chat.chat, chat.generate,
             adapters.adapters):
    cli.add_command(_cmd)


def main() -> None:
    try:
        rv = cli.main(prog_name="toolchain", standalone_mode=False)
    except ToolchainError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(common.BAD_INPUT_EXIT)
    except click.UsageError as e:  # bad input too: one line, exit 2, where to look
        where = e.ctx.command_path if e.ctx else "toolchain"
        click.echo(f"error: {e.format_message()} (see `{where} -h`)", err=True)
        sys.exit(common.BAD_INPUT_EXIT)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        sys.exit(common.INTERRUPTED_EXIT)
    except Exception as e:  # noqa: BLE001  a bug: one line, the traceback only when asked
        if common.state["debug"]:
            traceback.print_exc()
        click.echo(f"error: internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback", err=True)
        sys.exit(common.INTERNAL_EXIT)
    sys.exit(rv if isinstance(rv, int) else 0)  # --help and --version return 0


if __name__ == "__main__":
    main()
