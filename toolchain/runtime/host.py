"""The machine a figure was measured on: CPU model, the ISA flags that decide which kernels run, cores, threads.
Every report and bench result carries it, so a speed figure always names its CPU. No torch."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

# the flags that change which kernels ONNX Runtime (MLAS), torch (oneDNN) and llama.cpp pick
ISA = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
       "amx_bf16", "amx_int8", "amx_tile")


def cpuinfo(text: Optional[str] = None) -> dict:
    """Model name and ISA flags from /proc/cpuinfo (or the given text)."""
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model, "isa": [f for f in ISA if f in flags]}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def describe(threads: Optional[int] = None) -> dict:
    """{'cpu', 'isa', 'vnni', 'bf16', 'cores', 'threads', 'machine'} for this host; threads: what the run used."""
    info = cpuinfo()
    isa = set(info["isa"])
    cores = usable_cores()
    return {"cpu": info["model"], "isa": info["isa"], "vnni": bool(isa & {"avx512_vnni", "avx_vnni", "amx_int8"}),
            "bf16": bool(isa & {"avx512_bf16", "amx_bf16"}), "cores": cores, "threads": threads or cores,
            "machine": platform.machine(), "python": platform.python_version()}


def one_line(h: dict) -> str:
    """'AMD EPYC, 2 cores, 2 threads, avx2 avx512f avx512_vnni avx512_bf16' for tables and terminals."""
    return f"{h['cpu']}, {h['cores']} cores, {h['threads']} threads, {' '.join(h['isa']) or 'no AVX2'}"
