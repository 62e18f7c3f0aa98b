"""Artifacts built on this (AVX512-VNNI) host must hold on CPUs without VNNI: the host report reads the CPU's
own CPUID, and, where qemu-x86_64 is installed, the int8 encoder's forward runs under an emulated Haswell (AVX2, no
AVX512, no VNNI) and must give the native outputs (stages/quantize/dynamic.py has the measurements)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_qemu, run_as_cpu
from toolchain.report import markdown_encoder
from toolchain.runtime import host
from toolchain.runtime.encoder import int8_host_note

# a MatMulInteger of u8 255s by s8 127s over K=64: exact 2072640; 1048544 when pairs are summed in int16 with
# saturation (vpmaddubsw: MLAS's u8s8 kernel on AVX2 and AVX512 without VNNI). Built natively: importing onnx under
# qemu takes ~10 s of CPU, onnxruntime ~2 s.
SATURATION = """
import json, sys
import numpy as np, onnxruntime as ort
from toolchain.runtime import host
y = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, {"A": np.full((1, 64), 255, np.uint8)})[0]
print(json.dumps({"y": int(y[0, 0]), "host": host.describe()}))
"""


def _saturation_model(path: Path) -> Path:
    from onnx import TensorProto as T, helper as h, numpy_helper as nh, save

    g = h.make_graph([h.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                     [h.make_tensor_value_info("A", T.UINT8, [1, 64])], [h.make_tensor_value_info("Y", T.INT32, [1, 4])],
                     [nh.from_array(np.full((64, 4), 127, np.int8), "B")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 13)])
    m.ir_version = 8
    save(m, str(path))
    return path


EXACT, SATURATED = 255 * 127 * 64, 32767 * 32

# logits of every model.onnx under a folder on one batch (batch.npz), written to out.npz
FORWARD = """
import sys
from pathlib import Path
import numpy as np
from toolchain.runtime.encoder import ort_forward  # the validator's forward
b = dict(np.load(sys.argv[1]))
np.savez(sys.argv[2], **{p.parent.name: ort_forward(p, threads=1)(b) for p in sorted(Path(sys.argv[3]).glob("*/model.onnx"))})
"""


def _last_json(text: str) -> dict:
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def test_isa_comes_from_cpuid_and_matches_proc_cpuinfo_on_real_hardware():
    probe = host.cpuid_info()
    if probe is None:
        pytest.skip("CPUID cannot be run here (not x86-64 Linux, or no executable memory)")
    assert host.describe()["isa_source"] == "cpuid"
    assert set(probe["isa"]) == set(host.cpuinfo()["isa"]), "CPUID and /proc/cpuinfo disagree on this host"


def test_the_note_names_what_the_host_lacks():
    avx2 = {"isa": ["avx2", "fma", "f16c"], "vnni": False, "machine": "x86_64"}
    old = {"method": "quantize_dynamic", "weight_type": "int8", "per_channel": True}
    assert "can saturate" in int8_host_note(avx2, old) and "avx2 fma f16c" in int8_host_note(avx2, old)
    assert "keep them exact" in int8_host_note(avx2, {**old, "reduce_range": True})
    assert int8_host_note({**avx2, "vnni": True}, old) is None
    assert int8_host_note({**avx2, "machine": "aarch64"}, old) is None
    assert int8_host_note(avx2, {}) is None  # cpu-fp32: no int8 matmuls
    rep = {"target": "cpu-int8", "artifact": "a", "passed": True, "note": int8_host_note(avx2, old), "gates": [],
           "measured": {"latency_ms_p50": 1.0, "latency_ms_p95": 2.0, "peak_rss_mb": 1, "size_mb": 1}, "reference": {}}
    assert "Note: this CPU has no VNNI (avx2 fma f16c)" in markdown_encoder(rep)


@needs_qemu
def test_qemu_haswell_is_an_avx2_cpu_to_onnxruntime(tmp_path):
    """What the guards rest on: under -cpu Haswell the CPUID has no AVX512 or VNNI and ONNX Runtime's u8s8 int8
    kernel saturates, as on a real AVX2 machine (qemu 7.2's TCG has no AVX512 at all: -cpu Skylake-Server or max
    come out AVX2-only too)."""
    import subprocess
    import sys

    model = _saturation_model(tmp_path / "sat.onnx")
    r = run_as_cpu("Haswell", ["-c", SATURATION, model])
    assert r.returncode == 0, r.stderr[-2000:]
    emu = _last_json(r.stdout)
    assert emu["host"]["isa_source"] == "cpuid" and emu["host"]["vnni"] is False
    assert "avx2" in emu["host"]["isa"] and not any("avx512" in f for f in emu["host"]["isa"])
    assert emu["y"] == SATURATED
    if host.describe()["vnni"]:
        native = subprocess.run([sys.executable, "-c", SATURATION, model], capture_output=True, text=True,
                                cwd=Path(__file__).parent.parent)
        assert _last_json(native.stdout)["y"] == EXACT


@pytest.mark.slow
@needs_qemu
def test_int8_encoder_gives_the_same_tags_without_vnni(tiny_bert, tmp_path):
    """The shipped cpu-int8 settings give the native logits under an emulated Haswell; the full-range per-channel
    int8 they replaced does not (the control: this test would see the CI failure). ~25 s with the export."""
    from transformers import BertForTokenClassification

    from conftest import REPO
    from toolchain.runtime import encoder as rt
    from toolchain.stages.export.encoder import export
    from toolchain.stages.quantize import dynamic

    rows = rt.read_rows(REPO / "recipes/data/ner/eval.jsonl", "ner")[:32]
    labels = sorted({t for r in rows for t in r["tags"]})
    src = tmp_path / "src"
    BertForTokenClassification.from_pretrained(tiny_bert, num_labels=len(labels)).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(tiny_bert / f, src / f)
    export(src, "ner", tmp_path / "fp32", rows[:4], 64)
    dynamic.quantize(tmp_path / "fp32", "cpu-int8", tmp_path / "models" / "shipped")
    (tmp_path / "models" / "full-range").mkdir()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(tmp_path / "fp32" / rt.MODEL), str(tmp_path / "models" / "full-range" / rt.MODEL),
                     weight_type=QuantType.QInt8, per_channel=True)
    b = rt.encode(rt.load_tokenizer(src / rt.TOKENIZER, 64), rows, "ner")
    np.savez(tmp_path / "batch.npz", **{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    script = tmp_path / "forward.py"
    script.write_text(FORWARD)
    import subprocess
    import sys

    native = subprocess.run([sys.executable, script, tmp_path / "batch.npz", tmp_path / "native.npz", tmp_path / "models"],
                            capture_output=True, text=True, cwd=REPO)
    assert native.returncode == 0, native.stderr[-2000:]
    r = run_as_cpu("Haswell", [script, tmp_path / "batch.npz", tmp_path / "haswell.npz", tmp_path / "models"])
    assert r.returncode == 0, r.stderr[-2000:]
    nat, emu = np.load(tmp_path / "native.npz"), np.load(tmp_path / "haswell.npz")
    real = b["attention_mask"].astype(bool)
    tags = lambda x: rt.decode(x, b, rows, "ner", labels)  # noqa: E731
    assert tags(emu["shipped"]) == tags(nat["shipped"])
    assert np.abs(emu["shipped"] - nat["shipped"])[real].max() < 1e-4
    if host.describe()["vnni"]:  # the control only differs where the native kernel is VNNI's
        assert np.abs(emu["full-range"] - nat["full-range"])[real].max() > 1e-2
