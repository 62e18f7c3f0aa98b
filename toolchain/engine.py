"""The engine under the pipeline: a content-hashed stage cache, input hashing, and validation in its own process.

Stages never import this module: the pipeline hands each stage its inputs and an output folder, and the engine
decides whether the stage runs at all. A stage is reused when the hash of its inputs is the one recorded in
stages/.keys/<stage>.json beside its folder; every stage writes atomically, so a run killed mid-stage resumes at
that stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import sha256_file
from toolchain.runtime.memory import peak_rss_mb, reset_peak

console = Console(stderr=True, soft_wrap=True)  # a stage line is never cut mid-path when piped


@dataclass(frozen=True)
class StageOut:
    """What a stage left: its folder, the key its inputs hashed to, and the summary it returned."""
    out: Path
    key: str
    summary: dict
    reused: bool = False


class Stages:
    """Content-hashed stage cache: a stage is reused when its key (hash of its inputs) is the one recorded."""

    def __init__(self, root: Path, force: bool):
        self.root, self.force, self.lineage = root, force, []
        self.cost: dict[str, dict] = {}  # stage -> reused or not, wall seconds and peak RSS of this run's work on it
        (root / "stages" / ".keys").mkdir(parents=True, exist_ok=True)

    @property
    def reused(self) -> dict[str, bool]:
        """Stage -> whether this run reused it."""
        return {name: c["reused"] for name, c in self.cost.items()}

    def run(self, name: str, inputs: dict, fn: Callable[[Path], dict], out: Optional[Path] = None,
            borrow: Optional[Path] = None) -> StageOut:
        """borrow: the same stage's folder under another run's root (a fine-tune that `edge --recipe R` and
        `edge --adapters R,...` share); taken, hard-linked, when its recorded key is this one."""
        out = out or self.root / "stages" / name
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        rec = self.root / "stages" / ".keys" / f"{name}.json"
        recorded = json.loads(rec.read_text()) if not self.force and out.exists() and rec.is_file() else {}
        if recorded.get("key") != key and borrow is not None and not self.force:
            recorded = _borrow(borrow, key, out, rec) or recorded
        reused = recorded.get("key") == key
        if reused:
            console.print(f"[dim]{name}: inputs unchanged ({key}), reusing {out}[/dim]")
            summary = recorded["summary"]
        else:
            console.print(f"[bold]{name}[/bold] -> {out}")
            measured_rss, t0 = reset_peak(), time.perf_counter()
            summary = fn(out)
            cost = {"seconds": round(time.perf_counter() - t0, 1),
                    "peak_rss_mb": round(peak_rss_mb()) if measured_rss else None}
            console.print(f"[dim]{name}: {cost['seconds']} s" + (f", peak RSS {cost['peak_rss_mb']} MB[/dim]"
                                                                 if measured_rss else "[/dim]"))
            rec.write_text(json.dumps({"key": key, "inputs": inputs, "summary": summary, "cost": cost}, indent=2,
                                      default=str))
        # the lineage (the manifest's) keeps what the stage cost when it was built, in this run or an earlier one
        built = recorded.get("cost") if reused else cost
        self.lineage.append({"stage": name, "key": key, "out": str(out), **({"cost": built} if built else {})})
        self.cost[name] = {"reused": reused, **({"seconds": 0.0, "peak_rss_mb": None} if reused else cost)}
        return StageOut(out, key, summary, reused)


def _borrow(other: Path, key: str, out: Path, rec: Path) -> Optional[dict]:
    """Copy another root's stage folder (hard links: stage folders are never written after they are made) and its
    key record when that stage hashed to the same key; None when it did not."""
    other_rec = other.parent / ".keys" / f"{other.name}.json"
    if not (other.is_dir() and other_rec.is_file()):
        return None
    recorded = json.loads(other_rec.read_text())
    if recorded.get("key") != key:
        return None

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:  # another file system
            shutil.copy2(a, b)

    tmp = out.with_name(out.name + ".borrow")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(other, tmp, copy_function=link)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    rec.write_text(json.dumps(recorded, indent=2, default=str))
    console.print(f"[dim]{out.name}: the same stage as {other} ({key}), taken from there[/dim]")
    return recorded


def files_hash(paths: list[Path]) -> str:
    """One short hash over the contents of several files (order-independent)."""
    return hashlib.sha256("".join(sha256_file(p) for p in sorted(paths)).encode()).hexdigest()[:16]


def validate_in_own_process(art: Path) -> dict:
    """`toolchain validate --json` in a fresh process, as on a device: its peak RSS is the runtime's alone, not
    the training process's, and the device path runs exactly as shipped. Exit 1 (a missed gate) and 3 (the EP is
    missing here) still report."""
    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(art), "--json"], stdout=subprocess.PIPE)
    if r.returncode not in (0, 1, 3):  # 3: built, not validated here (EP missing)
        raise ToolchainError(f"validation of {art} failed (exit {r.returncode}); run `toolchain validate {art}` to see why")
    return json.loads(r.stdout)
