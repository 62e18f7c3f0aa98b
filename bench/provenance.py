"""The three fields every bench/results/*.json records about its run: the commit, the host, the command."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def fields(threads: Optional[int] = None) -> dict:
    """{"commit": short hash or "unknown", "host": toolchain.runtime.host.describe(), "command": "python ..."}."""
    sys.path.insert(0, str(REPO))
    from toolchain.runtime.host import describe

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"commit": commit, "host": describe(threads), "command": "python " + " ".join(sys.argv)}
