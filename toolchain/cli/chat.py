"""The device commands that talk to an artifact (torch-free, in the `runtime` extra): chat, generate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolchain.cli.common import detail, err_console, note
from toolchain.runtime.errors import ToolchainError

artifact_arg = click.argument("artifact", type=click.Path())
system_opt = click.option("--system", default=None, metavar="TEXT", help="A system message to start from.")
max_new_opt = click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                           metavar="N", help="Stop an answer after N new tokens.")
adapter_opt = click.option("--adapter", default=None, metavar="NAME",
                           help="A multi-adapter artifact: answer with this adapter (default: the base alone).")
threads_opt = click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
                           help="Intra-op threads (default: the artifact's device_profile.json, else every usable core).")


def _stats(a) -> str:
    rate = f"{a.decode_tok_s:.1f} tok/s" if a.decode_tok_s is not None else "- tok/s"
    return f"[{len(a.tokens)} tokens, {rate}]"


def _say(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _open(artifact, system, threads, raw=False, adapter=None):
    from toolchain.runtime import host, session
    from toolchain.runtime.chat import Chat

    c = Chat(Path(artifact), system=system, threads=threads, raw=raw, adapter=adapter)
    ads = f"; adapters {', '.join(c.adapters)}, answering with {c.adapter or 'the base alone'}" if c.adapters else ""
    detail(f"{artifact}: {session.one_line(c.settings)}; host {host.one_line(host.describe(session.threads(c.settings)))}{ads}")
    for w in session.warnings(c.settings):
        err_console.print(f"warning: {w}")
    return c


@click.command(epilog="""\b
Examples:
  toolchain chat artifacts/smollm2-135m-chat-lora/cpu-int4
  toolchain chat cpu-int4/ -p "Book 2 seats in Oslo for 3 May. Name: Ana Lee."
  printf 'hi\\n/reset\\nhello again\\n' | toolchain chat cpu-int4/
  toolchain chat artifacts/smollm2-135m-adapters/cpu-int4 --adapter classify""")
@artifact_arg
@system_opt
@adapter_opt
@click.option("-p", "--prompt", default=None, metavar="PROMPT", help="Answer this one prompt, then exit.")
@click.option("--lookup", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Prompt-lookup decoding with drafts of up to K tokens (the answer prints when complete).")
@max_new_opt
@threads_opt
def chat(artifact, system, adapter, prompt, lookup, max_new_tokens, threads):
    """Talk to an artifact with its own chat template, the answer streamed as it is produced; `[N tokens, X tok/s]`
    after each answer on stderr.

    With a terminal: a conversation (/reset forgets it, /exit or Ctrl-D ends it; on a multi-adapter artifact
    /adapter NAME switches adapters, /adapter none to the base alone). With -p: one answer. With stdin piped: each
    line is a turn of one conversation."""
    c = _open(artifact, system, threads, adapter=adapter)

    def turn(text: str) -> None:
        a = c.ask(text, max_new_tokens, on_text=_say, lookup=lookup)
        _say("\n")
        click.echo(_stats(a), err=True)

    if prompt is not None:
        return turn(prompt)
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  line editing and history for input(), where the platform has it
        except ImportError:
            pass
        note(f"{artifact}: /reset forgets the conversation, /exit or Ctrl-D ends it")
    while True:
        if tty:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                _say("\n")
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break  # the end of the piped input
        line = line.strip()
        if line == "/exit":
            break
        if line == "/reset":
            c.reset()
            note("(conversation cleared)")
        elif line == "/adapter" or line.startswith("/adapter "):
            name = line.split(maxsplit=1)[1] if " " in line else None
            try:
                if name is not None:
                    c.use(None if name == "none" else name)
                note(f"(adapter: {c.adapter or 'none, the base alone'}; loaded: {', '.join(c.adapters) or 'none'})")
            except ToolchainError as e:
                click.echo(f"error: {e}", err=True)
        elif line:
            try:
                turn(line)
            except ToolchainError as e:  # e.g. the context is full: say so, keep the session
                click.echo(f"error: {e}", err=True)
            except KeyboardInterrupt:  # Ctrl-C stops this answer (it is not kept), not the session
                if not tty:
                    raise
                _say("\n")
                note("(answer interrupted)")


@click.command(epilog="""\b
Examples:
  toolchain generate cpu-int4/ -p "Book 2 seats in Oslo for 3 May. Name: Ana Lee."
  toolchain generate cpu-int4/ -p "Once upon a time" --raw --max-new-tokens 32
  toolchain generate cpu-int4/ -p "hi" --json | jq .decode_tok_s""")
@artifact_arg
@click.option("-p", "--prompt", required=True, metavar="PROMPT", help="The user message (the text itself with --raw).")
@system_opt
@max_new_opt
@click.option("--raw", is_flag=True, help="Send the prompt as it is, without the chat template.")
@adapter_opt
@threads_opt
@click.option("--json", "as_json", is_flag=True,
              help="Print {text, tokens, prompt_tokens, new_tokens, ttft_ms, decode_tok_s, stopped}.")
def generate(artifact, prompt, system, max_new_tokens, raw, adapter, threads, as_json):
    """One completion, for scripts: greedy, printed when complete."""
    a = _open(artifact, system, threads, raw, adapter).ask(prompt, max_new_tokens)
    click.echo(json.dumps(a.out()) if as_json else a.text)
