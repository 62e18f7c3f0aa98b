"""The device commands on a tiny cpu-int4 artifact, built once for the module: the thread count a run uses and
records, and the CLI around it. Every command here runs torch-free, as on a device."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_runtime_torch_free import BLOCK_TORCH


@pytest.fixture(scope="module")
def built(tiny_phi3, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Phi-3 edge run to cpu-int4 (about a minute): (its recipe file, the artifact). Shared; tests copy the
    artifact before changing anything."""
    from conftest import tiny_recipe_file
    from toolchain import pipeline

    root = tmp_path_factory.mktemp("device")
    rec = tiny_recipe_file(root, gates={})
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int4", out=root / "artifacts")
    return rec, Path(rep["headline"]["artifact"])


@pytest.fixture(scope="module")
def artifact(built) -> Path:
    return built[1]


@pytest.fixture
def art(artifact, tmp_path) -> Path:
    """A private copy of the artifact, as a user would copy it to a device."""
    out = tmp_path / "cpu-int4"
    shutil.copytree(artifact, out)
    return out


def device(*args, stdin=None, cwd=REPO, block_matplotlib=False) -> subprocess.CompletedProcess:
    """`toolchain ARGS` with torch, transformers and peft unimportable (and matplotlib, when asked)."""
    block = BLOCK_TORCH.replace("'accelerate')", "'accelerate', 'matplotlib')") if block_matplotlib else BLOCK_TORCH
    assert "matplotlib" in block or not block_matplotlib
    code = block + "import sys; from toolchain.cli import main; sys.argv = ['toolchain', *sys.argv[1:]]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          input=stdin)


COUNT_THREADS = BLOCK_TORCH + """
import os, sys
from pathlib import Path
from toolchain.runtime import genai, session
folder = Path(sys.argv[1])
settings = session.resolve(folder, int(sys.argv[2]) if len(sys.argv) > 2 else None)
before = len(os.listdir('/proc/self/task'))
model, tok = genai.load(folder, session=settings if len(sys.argv) > 2 else None)
print(len(os.listdir('/proc/self/task')) - before)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_load_defaults_to_the_usable_cores_and_threads_override(artifact):
    """onnxruntime-genai alone runs one intra-op thread; load() gives it every usable core, or what is asked for.
    Its intra-op pool has N-1 threads besides the caller's, so the counts differ by exactly the thread difference."""
    def started(*threads) -> int:
        r = subprocess.run([sys.executable, "-c", COUNT_THREADS, str(artifact), *map(str, threads)],
                           capture_output=True, text=True, cwd=REPO)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    one = started(1)
    assert started(3) - one == 2
    assert started() - one == len(os.sched_getaffinity(0)) - 1


def test_validate_records_the_threads_it_ran(art):
    r = device("validate", art, "--json", "--threads", 1)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["host"]["threads"] == 1 and rep["host"]["cores"] == len(os.sched_getaffinity(0))
    assert rep["session"]["intra_op_num_threads"] == {"value": 1, "from": "--threads"}
    assert rep["session"]["session.intra_op.allow_spinning"] == {"value": "1", "from": "genai_config.json"}
    r = device("validate", art)
    assert r.returncode == 0, r.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"{cores} cores, {cores} threads" in r.stdout and "(default)" in r.stdout
    assert f"{cores} cores, {cores} threads" in (art / "report.md").read_text()


def test_tune_writes_a_profile_that_validate_applies(art):
    r = device("tune", art, "--threads", "1,2", "--spinning", "0,1", "--runs", 2, "--json")
    assert r.returncode == 0, r.stderr
    prof = json.loads(r.stdout)
    assert json.loads((art / "device_profile.json").read_text()) == prof
    assert [(m["intra_op_num_threads"], m["session.intra_op.allow_spinning"]) for m in prof["measured"]] == [
        (1, "0"), (1, "1"), (2, "0"), (2, "1")]
    best = max(prof["measured"], key=lambda m: m["decode_tok_s_p50"])
    assert prof["session_options"] == {"intra_op_num_threads": best["intra_op_num_threads"],
                                       "session.intra_op.allow_spinning": best["session.intra_op.allow_spinning"]}
    assert prof["host"]["threads"] == best["intra_op_num_threads"] and prof["created"]
    r = device("validate", art, "--json")
    assert r.returncode == 0, r.stderr  # the manifest still holds: the profile is not one of its files
    rep = json.loads(r.stdout)
    assert rep["session"]["intra_op_num_threads"] == {"value": best["intra_op_num_threads"], "from": "profile"}
    assert rep["session"]["session.intra_op.allow_spinning"]["from"] == "profile"
    assert rep["host"]["threads"] == best["intra_op_num_threads"]
    rep = json.loads(device("validate", art, "--json", "--threads", 3).stdout)
    assert rep["session"]["intra_op_num_threads"] == {"value": 3, "from": "--threads"}
    assert rep["session"]["session.intra_op.allow_spinning"]["from"] == "profile"


@pytest.mark.parametrize("weight", ["model.onnx.data", "model.onnx"])
def test_a_tuned_artifact_still_fails_on_a_tampered_weight(art, weight):
    assert device("tune", art, "--threads", "1", "--spinning", "1", "--runs", 1).returncode == 0
    blob = bytearray((art / weight).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (art / weight).write_bytes(bytes(blob))
    r = device("validate", art)
    assert r.returncode == 2 and f"{weight}: sha256 differs from the manifest" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("profile, key", [
    ({"session_options": {"intra_op_num_threads": 2, "graph_optimization_level": "ORT_DISABLE_ALL"}},
     "key 'session_options.graph_optimization_level': unknown key (allowed: intra_op_num_threads, "
     "session.intra_op.allow_spinning)"),
    ({"session_options": {"intra_op_num_threads": 0}}, "key 'session_options.intra_op_num_threads': Input should be"),
    ({"session_options": {"intra_op_num_threads": "2"}}, "key 'session_options.intra_op_num_threads': Input should be"),
    ({"session_options": {"session.intra_op.allow_spinning": "yes"}},
     "key 'session_options.session.intra_op.allow_spinning': Input should be '0' or '1'"),
    ({"session_options": {}, "provider_options": {"cuda": {}}}, "key 'provider_options': unknown key"),
])
def test_a_profile_outside_the_whitelist_is_refused(art, profile, key):
    (art / "device_profile.json").write_text(json.dumps(profile))
    for cmd in (["validate", art], ["generate", art, "-p", "hi"], ["chat", art, "-p", "hi"]):
        r = device("-q", *cmd)  # quiet: no progress lines, so the error is all of stderr
        assert r.returncode == 2, (cmd, r.stderr)
        assert f"{art / 'device_profile.json'}: {key}" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "toolchain tune" in r.stderr


def test_a_profile_from_another_host_is_applied_with_a_warning(art):
    (art / "device_profile.json").write_text(json.dumps({
        "session_options": {"intra_op_num_threads": 1}, "host": {"cpu": "Some Other CPU", "cores": 64}}))
    r = device("validate", art, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["session"]["intra_op_num_threads"]["value"] == 1
    assert "warning: device_profile.json was tuned on Some Other CPU with 64 cores" in r.stderr


def _tail_free(text: str) -> str:
    """The text without a trailing half character: a byte-level token cut off at max_new_tokens decodes to U+FFFD
    in one decode of all the tokens, and is held back by the streaming decoder."""
    return text.rstrip("\n").rstrip("\ufffd")


def test_generate_prints_the_completion_and_json(art):
    r = device("generate", art, "-p", "Book 2 seats in Oslo for 3 May.", "--max-new-tokens", 12, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"text", "tokens", "prompt_tokens", "new_tokens", "ttft_ms", "decode_tok_s", "stopped"}
    assert isinstance(out["text"], str) and all(isinstance(t, int) for t in out["tokens"])
    assert out["new_tokens"] == len(out["tokens"]) <= 12 and out["stopped"] in ("eos", "length")
    assert (out["stopped"] == "length") == (out["new_tokens"] == 12)
    assert isinstance(out["prompt_tokens"], int) and out["ttft_ms"] > 0
    assert out["decode_tok_s"] is None or out["decode_tok_s"] > 0
    r = device("generate", art, "-p", "Book 2 seats in Oslo for 3 May.", "--max-new-tokens", 12)
    assert r.returncode == 0 and _tail_free(r.stdout) == _tail_free(out["text"])
    raw = json.loads(device("generate", art, "-p", "Book 2 seats in Oslo for 3 May.", "--raw", "--json").stdout)
    templated = json.loads(device("generate", art, "-p", "Book 2 seats in Oslo for 3 May.", "--system", "Be brief.",
                                  "--json").stdout)
    assert raw["prompt_tokens"] < out["prompt_tokens"] < templated["prompt_tokens"]  # template, then a system turn
    r = device("generate", art, "-p", "x", "--raw", "--system", "Be brief.")
    assert r.returncode == 2 and "--raw" in r.stderr


def test_chat_one_shot_streams_what_generate_prints(art):
    r = device("chat", art, "-p", "hello", "--max-new-tokens", 16)
    assert r.returncode == 0, r.stderr
    g = device("generate", art, "-p", "hello", "--max-new-tokens", 16)
    assert _tail_free(r.stdout) == _tail_free(g.stdout)
    assert re.search(r"^\[\d+ tokens, ([\d.]+|-) tok/s\]$", r.stderr.strip(), re.M)


def test_chat_reads_turns_from_piped_stdin(art):
    """Each line a turn of one conversation; /reset forgets it, so the same first question gets the same answer."""
    r = device("chat", art, "--max-new-tokens", 8, stdin="hello\n/reset\nhello\n/exit\nnever asked\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(" tokens, ") == 2 and "(conversation cleared)" in r.stderr
    half = len(r.stdout) // 2
    assert r.stdout[:half] == r.stdout[half:] and r.stdout.endswith("\n")


def test_chat_keeps_the_conversation_until_reset(artifact):
    from toolchain.runtime.chat import Chat

    c = Chat(artifact, system="Be brief.")
    first = c.ask("hello", 4)
    second = c.ask("hello", 4)
    assert second.prompt_tokens > first.prompt_tokens + 4 and [m["role"] for m in c.messages] == [
        "system", "user", "assistant", "user", "assistant"]
    c.reset()
    again = c.ask("hello", 4)
    assert again.prompt_tokens == first.prompt_tokens and again.tokens == first.tokens


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_chat_interactive_on_a_terminal(art):
    """Through a pty, as a person types: a prompt, an answer with its stats, /reset, another turn, Ctrl-D."""
    import select

    master, slave = os.openpty()
    code = BLOCK_TORCH + "import sys; from toolchain.cli import main; sys.argv = ['toolchain', *sys.argv[1:]]; main()"
    p = subprocess.Popen([sys.executable, "-c", code, "chat", str(art), "--max-new-tokens", "6"], stdin=slave,
                         stdout=slave, stderr=slave, cwd=REPO, close_fds=True)
    os.close(slave)
    log, pending = b"", b""

    def until(marker: bytes, timeout: float = 120) -> None:
        """Read the terminal until `marker`, and consume up to it (a later wait needs a later occurrence)."""
        nonlocal log, pending
        import time

        end = time.time() + timeout
        while marker not in pending:
            assert time.time() < end and p.poll() is None, log.decode(errors="replace")
            if select.select([master], [], [], 1)[0]:
                chunk = os.read(master, 4096)
                log, pending = log + chunk, pending + chunk
        pending = pending[pending.index(marker) + len(marker):]

    try:
        until(b"> ")
        os.write(master, b"hello\n")
        until(b" tokens, ")
        until(b"> ")
        os.write(master, b"/reset\n")
        until(b"(conversation cleared)")
        until(b"> ")
        os.write(master, b"hello again\n")
        until(b" tokens, ")
        until(b"> ")
        os.write(master, b"\x04")  # Ctrl-D at the prompt ends the session
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    assert b"Traceback" not in log and log.count(b" tokens, ") == 2


def test_validate_piped_shows_progress_lines_and_quiet_shows_none(art):
    r = device("validate", art)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "validate: checking every file against the manifest's sha256" in lines
    assert "validate: held-out generation 8/8" in lines and all(x.startswith("validate: ") for x in lines)
    assert not any("\r" in x or "\x1b" in x for x in lines)  # no spinner frames
    q = device("-q", "validate", art)
    assert q.returncode == 0 and q.stderr == "" and q.stdout.startswith("cpu-int4 on cpu: decode ")
    host_line = next(x for x in q.stdout.splitlines() if x.startswith("  host: "))
    assert len(host_line) > 80 and "session: " in host_line and host_line.endswith(")")  # one line, not wrapped


def test_edge_and_scenarios_print_json(built, tiny_phi3):
    """`toolchain edge --json`, every stage reused: the report with its headline, as numbers and booleans."""
    rec, art = built
    r = subprocess.run([sys.executable, "-m", "toolchain", "-q", "edge", "--model", str(tiny_phi3), "--recipe", str(rec),
                        "--out", str(art.parent.parent), "--json"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    h = rep["headline"]
    assert rep["passed"] is True and h["artifact"] == str(art) and isinstance(h["decode_tok_s"], float)
    assert all(h["stages_reused"].values()) and isinstance(rep["session"]["intra_op_num_threads"]["value"], int)
    assert "NaN" not in r.stdout
    r = device("scenarios", "--out", art.parent.parent, "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert (row["target"], row["metric"], row["passed"]) == ("cpu-int4", "exact_match", True)
    assert isinstance(row["speed"], float) and row["speed_unit"] == "decode tok/s p50"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_validate_with_data_scores_and_writes_nothing_into_the_artifact(art, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join((REPO / "recipes/data/chat-lora/eval.jsonl").read_text().splitlines(True)[:3]))
    before = _files(art)
    r = device("validate", art, "--data", data)
    assert r.returncode == 0, r.stderr
    assert f"scored, no gates ({data})" in r.stdout and "gate" not in r.stderr
    r = device("validate", art, "--data", data, "--json", "--report-out", tmp_path / "out" / "mine.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["status"] == "scored" and "passed" not in rep and rep["gates"] == [] and rep["data"] == str(data)
    assert json.loads((tmp_path / "out" / "mine.json").read_text()) == rep
    assert _files(art) == before  # the packaged report.json, report.md and report.png are the build's


@pytest.mark.parametrize("matplotlib", [True, False])
def test_plain_validate_rewrites_report_json_and_md_and_png_where_it_can(art, matplotlib):
    for name in ("report.json", "report.md", "report.png"):
        (art / name).write_bytes(b"stale")
    r = device("validate", art, block_matplotlib=not matplotlib)
    assert r.returncode == 0, r.stderr
    assert json.loads((art / "report.json").read_text())["status"] == "passed"
    md = (art / "report.md").read_text()
    assert md.startswith("# cpu-int4") and "Host: " in md and "Session: " in md
    if matplotlib:
        assert (art / "report.png").read_bytes().startswith(b"\x89PNG") and "![targets](report.png)" in md
    else:  # no plot on this device: no stale one left behind, and no link to one
        assert not (art / "report.png").exists() and "report.png" not in md
    assert device("-q", "validate", art, "--json").returncode == 0  # the manifest still holds


def test_generate_without_a_chat_template_says_to_use_raw(art):
    (art / "chat_template.jinja").unlink()
    cfg = json.loads((art / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (art / "tokenizer_config.json").write_text(json.dumps(cfg))
    r = device("-q", "generate", art, "-p", "hi")
    assert r.returncode == 2 and "no usable chat template" in r.stderr and "--raw" in r.stderr
    r = device("generate", art, "-p", "hi", "--raw", "--max-new-tokens", 4, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["new_tokens"] <= 4
