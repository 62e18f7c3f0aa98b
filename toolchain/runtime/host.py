"""The machine a figure was measured on: CPU model, the ISA flags that decide which kernels run, cores, threads.
Every report and bench result carries it, so a speed figure always names its CPU. No torch.

The ISA flags come from the CPUID instruction itself (and XGETBV for what the OS enabled) where this is an x86-64
Linux host: that is what ONNX Runtime's MLAS reads to pick its kernels. /proc/cpuinfo is the fallback, and can
disagree: under qemu user-mode emulation (`qemu-x86_64 -cpu Haswell`, how the tests emulate an AVX2-only CPU) it
shows the real host's flags while MLAS sees the emulated CPU's."""
from __future__ import annotations

import functools
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


# (leaf, subleaf, register, bit) of each flag; XCR0 bits the OS must have enabled for it to be usable
_CPUID_BITS = {"fma": (1, 0, 2, 12), "f16c": (1, 0, 2, 29), "avx2": (7, 0, 1, 5), "avx512f": (7, 0, 1, 16),
               "avx512bw": (7, 0, 1, 30), "avx512vl": (7, 0, 1, 31), "avx512_vnni": (7, 0, 2, 11),
               "avx_vnni": (7, 1, 0, 4), "avx512_bf16": (7, 1, 0, 5), "amx_bf16": (7, 0, 3, 22),
               "amx_tile": (7, 0, 3, 24), "amx_int8": (7, 0, 3, 25)}
_XCR0_AVX, _XCR0_AVX512, _XCR0_AMX = 0x6, 0xE6, 0x60000
# cpuid(leaf=edi, subleaf=esi) -> out[4] (rdx): push rbx; mov eax,edi; mov ecx,esi; mov r8,rdx; cpuid; 4 stores; pop
_CPUID_CODE = bytes.fromhex("5389f889f14989d00fa241890041895804418948084189500c5bc3")
_XGETBV_CODE = bytes.fromhex("31c90f01d048c1e2204809d0c3")  # xor ecx,ecx; xgetbv; rax = edx:eax; ret


@functools.lru_cache(maxsize=1)
def cpuid_info() -> Optional[dict]:
    """{'model', 'isa'} from the CPUID instruction (x86-64 Linux only), None where it cannot be run here."""
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        import ctypes
        import mmap

        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(_CPUID_CODE + _XGETBV_CODE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(page))
        regs = ctypes.c_uint32 * 4
        raw = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(base)

        def cpuid(leaf: int, sub: int = 0) -> tuple:
            out = regs()
            raw(leaf, sub, out)
            return tuple(out)

        top = cpuid(0)[0]
        leaves = {(1, 0): cpuid(1), (7, 0): cpuid(7, 0) if top >= 7 else (0,) * 4}
        leaves[(7, 1)] = cpuid(7, 1) if top >= 7 and leaves[(7, 0)][0] >= 1 else (0,) * 4
        osxsave = leaves[(1, 0)][2] >> 27 & 1
        xcr0 = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + len(_CPUID_CODE))() if osxsave else 0
        brand = ""
        if cpuid(0x80000000)[0] >= 0x80000004:
            brand = b"".join(int(r).to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004)
                             for r in cpuid(leaf)).split(b"\0")[0].decode(errors="replace").strip()
    except (OSError, ValueError, AttributeError, TypeError):  # no executable mapping allowed, or no mmap.PROT_EXEC
        return None
    flags = {f for f, (leaf, sub, reg, bit) in _CPUID_BITS.items() if leaves[(leaf, sub)][reg] >> bit & 1}
    need = lambda f: _XCR0_AMX if f.startswith("amx") else _XCR0_AVX512 if "avx512" in f else _XCR0_AVX
    return {"model": brand, "isa": [f for f in ISA if f in flags and xcr0 & need(f) == need(f)]}


def describe(threads: Optional[int] = None) -> dict:
    """{'cpu', 'isa', 'isa_source', 'vnni', 'bf16', 'cores', 'threads', 'machine'} for this host; threads: what the
    run used. isa is what the CPUID instruction says (what ONNX Runtime picks its kernels from) where it can be
    read, else /proc/cpuinfo's flags."""
    info, probe = cpuinfo(), cpuid_info()
    if probe is not None:
        info = {"model": probe["model"] or info["model"], "isa": probe["isa"], "isa_source": "cpuid"}
    else:
        info["isa_source"] = "/proc/cpuinfo"
    isa = set(info["isa"])
    cores = usable_cores()
    return {"cpu": info["model"], "isa": info["isa"], "isa_source": info["isa_source"],
            "vnni": bool(isa & {"avx512_vnni", "avx_vnni", "amx_int8"}),
            "bf16": bool(isa & {"avx512_bf16", "amx_bf16"}), "cores": cores, "threads": threads or cores,
            "machine": platform.machine(), "python": platform.python_version()}


def one_line(h: dict) -> str:
    """'AMD EPYC, 2 cores, 2 threads, avx2 avx512f avx512_vnni avx512_bf16' for tables and terminals."""
    return f"{h['cpu']}, {h['cores']} cores, {h['threads']} threads, {' '.join(h['isa']) or 'no AVX2'}"
