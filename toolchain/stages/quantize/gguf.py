"""GGUF targets (gguf-q8_0, gguf-q4_k_m): the merged HF folder as one GGUF file for llama.cpp, made by llama.cpp's
own tools, so a llama.cpp user gets the same fine-tune as the ONNX artifacts.

    gguf-q8_0    convert_hf_to_gguf.py --outtype q8_0: the converter writes Q8_0 itself (pure Python, no compiled
                 llama.cpp needed)
    gguf-q4_k_m  convert_hf_to_gguf.py --outtype f32, then llama.cpp's quantizer (llama_cpp.llama_model_quantize,
                 only where llama-cpp-python is installed: `make bench` builds it once, or pip install it)

The converter is convert_hf_to_gguf.py with its gguf-py and conversion/ package from the llama.cpp that the
llama-cpp-python source distribution vendors (LLAMA_CPP_PYTHON), so converter and runtime come from one llama.cpp.
It is fetched once with `pip download` into TOOLCHAIN_HOME/llama.cpp/ (`converter()`); bench/decode.py converts and
quantizes with the same functions.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from toolchain.config.catalog import home
from toolchain.config.targets import get
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist the converter comes from (the Makefile's LLAMA_CPP builds the same wheel)
EXPORTER = f"llama.cpp convert_hf_to_gguf.py (vendored in llama-cpp-python {LLAMA_CPP_PYTHON})"
CONVERTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself
FTYPES = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15}  # llama.h LLAMA_FTYPE_MOSTLY_*: what llama_model_quantize writes
NO_QUANTIZER = ("needs llama.cpp's quantizer, from llama-cpp-python, which is not installed here: run `make bench` "
                f"once (it builds the wheel for this CPU), or `pip install llama-cpp-python=={LLAMA_CPP_PYTHON}`")


def file_name(precision: str) -> str:
    """The GGUF's name in the artifact (and the stage folder), by llama.cpp's own quant name."""
    return f"model-{precision.upper()}.gguf"


def converter() -> Path:
    """convert_hf_to_gguf.py from the llama-cpp-python source distribution (its vendor/llama.cpp, with gguf-py and
    conversion/), fetched once into TOOLCHAIN_HOME/llama.cpp/ with pip and unpacked atomically."""
    root = home() / "llama.cpp"
    base = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    script = base / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    root.mkdir(parents=True, exist_ok=True)
    tar = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not tar.is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(root)], capture_output=True, text=True)
        if r.returncode != 0 or not tar.is_file():
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ToolchainError(f"could not fetch llama.cpp's converter (pip download llama-cpp-python=="
                                 f"{LLAMA_CPP_PYTHON} --no-binary :all: into {root}): {tail[0]}; check the network "
                                 "or the pip index, or put that sdist in the folder yourself")
    top = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp"
    with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
        r = subprocess.run(["tar", "xzf", str(tar), "-C", tmp, f"{top}/convert_hf_to_gguf.py", f"{top}/gguf-py",
                            f"{top}/conversion"], capture_output=True, text=True)
        if r.returncode != 0:
            raise ToolchainError(f"{tar}: could not unpack llama.cpp's converter ({r.stderr.strip()[-300:]}); delete "
                                 "the file to fetch it again")
        dest = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(Path(tmp) / f"llama_cpp_python-{LLAMA_CPP_PYTHON}", dest)
    return script


def convert(merged: Path, out_file: Path, outtype: str) -> Path:
    """llama.cpp's converter on an HF folder: `outtype` f32, f16, bf16 or q8_0. Its own gguf-py is used (not an
    installed `gguf`), as llama.cpp runs it. A model or tokenizer it does not know fails here with its last line."""
    if outtype not in CONVERTER_OUTTYPES:
        raise ToolchainError(f"llama.cpp's converter writes {', '.join(CONVERTER_OUTTYPES)}, not '{outtype}'")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    r = subprocess.run([sys.executable, str(converter()), str(merged), "--outtype", outtype, "--outfile", str(out_file)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0 or not Path(out_file).is_file():
        lines = [x for x in (r.stderr or r.stdout).strip().splitlines() if x.strip()]
        raise ToolchainError(f"llama.cpp's convert_hf_to_gguf.py could not convert {merged}: "
                             f"{lines[-1] if lines else 'exit ' + str(r.returncode)} (it converts the architectures "
                             "and tokenizers llama.cpp knows; the ONNX targets do not depend on it)")
    return Path(out_file)


def have_quantizer() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def check_buildable(target: str) -> None:
    """Before any stage runs: the converter is here (fetched now if not), and a target that needs llama.cpp's
    quantizer finds llama-cpp-python."""
    t = get(target)
    if t["precision"] not in CONVERTER_OUTTYPES and not have_quantizer():
        raise ToolchainError(f"target '{target}' {NO_QUANTIZER}; gguf-q8_0 builds without it")
    converter()


def quantize(src: Path, dst: Path, precision: str, threads: Optional[int] = None) -> Path:
    """llama.cpp's quantizer (llama_model_quantize) from an f32/f16 GGUF to `precision` (q4_k_m, q4_0, q8_0)."""
    try:
        import llama_cpp
    except ImportError:
        raise ToolchainError(f"{precision.upper()} {NO_QUANTIZER}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[precision]
    params.nthread = threads or len(os.sched_getaffinity(0))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not Path(dst).is_file():
        raise ToolchainError(f"llama.cpp's llama_model_quantize {precision.upper()} failed on {src} (return code {rc})")
    return Path(dst)


def describe(path: Path) -> dict:
    """What the GGUF says about itself: architecture, tokenizer model and pre-tokenizer (llama.cpp's converter chose
    it by how the tokenizer splits a test text), tensor count, whether it carries a chat template."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    return {"architecture": field("general.architecture"), "tokenizer": field("tokenizer.ggml.model"),
            "pre_tokenizer": field("tokenizer.ggml.pre"), "tensors": len(reader.tensors),
            "chat_template": field("tokenizer.chat_template") is not None}


def build(merged: Path, target: str, out: Path) -> dict:
    """The stage: `out`/model-<PRECISION>.gguf from the merged HF folder (atomically); returns its summary (also
    gguf_report.json in the stage folder)."""
    from toolchain.stages.export.decoder import check_source

    t = get(target)
    if t["built_by"] != "llama.cpp":
        raise ToolchainError(f"target '{target}' is not a GGUF target (built_by '{t['built_by']}')")
    merged, precision = Path(merged), t["precision"]
    check_source(merged)
    t0 = time.time()
    name = file_name(precision)
    with atomic_dir(Path(out)) as tmp:
        if precision in CONVERTER_OUTTYPES:
            convert(merged, tmp / name, precision)
            how = {"converter_outtype": precision}
        else:
            if not have_quantizer():
                raise ToolchainError(f"target '{target}' {NO_QUANTIZER}")
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".gguf-f32-") as work:
                f32 = convert(merged, Path(work) / "model-F32.gguf", "f32")  # the merged weights are fp32
                quantize(f32, tmp / name, precision)
            from importlib.metadata import version

            how = {"converter_outtype": "f32", "quantizer": "llama_cpp.llama_model_quantize",
                   "llama_ftype": FTYPES[precision], "llama_cpp_python": version("llama-cpp-python")}
        summary = {"target": target, "gguf": name, "converter": EXPORTER, **how,
                   "size_mb": round((tmp / name).stat().st_size / 1e6, 2), **describe(tmp / name),
                   "seconds": round(time.time() - t0, 1)}
        (tmp / "gguf_report.json").write_text(json.dumps(summary, indent=2))
    return summary
