"""The device commands on a tiny cpu-int4 artifact, built once for the module: the thread count a run uses and
records, and the CLI around it. Every command here runs torch-free, as on a device."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_runtime_torch_free import BLOCK_TORCH


@pytest.fixture(scope="module")
def artifact(tiny_phi3, tmp_path_factory) -> Path:
    """A tiny Phi-3 cpu-int4 artifact (about a minute to build), shared; tests copy it before changing anything."""
    from conftest import tiny_recipe_file
    from toolchain import pipeline

    root = tmp_path_factory.mktemp("device")
    rep = pipeline.edge(str(tiny_phi3), str(tiny_recipe_file(root, gates={})), target="cpu-int4", out=root / "artifacts")
    return Path(rep["headline"]["artifact"])


@pytest.fixture
def art(artifact, tmp_path) -> Path:
    """A private copy of the artifact, as a user would copy it to a device."""
    out = tmp_path / "cpu-int4"
    shutil.copytree(artifact, out)
    return out


def device(*args, stdin=None, cwd=REPO) -> subprocess.CompletedProcess:
    """`toolchain ARGS` with torch, transformers and peft unimportable."""
    code = BLOCK_TORCH + "import sys; from toolchain.cli import main; sys.argv = ['toolchain', *sys.argv[1:]]; main()"
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
    for cmd in (["validate", art],):
        r = device(*cmd)
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
