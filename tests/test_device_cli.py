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
