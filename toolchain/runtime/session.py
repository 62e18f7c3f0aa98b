"""The ONNX Runtime session settings a run uses, and where each came from. No torch.

onnxruntime-genai runs one intra-op thread unless genai_config.json says otherwise (it ran one on a 2-core AVX2
host: 50 tok/s decode against 81 with two). So a run defaults to this host's usable cores, unless the artifact's
genai_config.json sets a count or an explicit --threads does. The settings reach onnxruntime-genai as an overlay on
the config it read (og.Config.overlay): no file in the artifact is edited, so its manifest hashes still hold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from toolchain.runtime import host

THREADS = "intra_op_num_threads"
SPINNING = "session.intra_op.allow_spinning"  # an ONNX Runtime session config entry; its default is "1" (spin)


def _shipped(folder: Path) -> dict:
    """The session_options genai_config.json ships with ({} for a folder without one)."""
    path = Path(folder) / "genai_config.json"
    try:
        return json.loads(path.read_text())["model"]["decoder"].get("session_options", {})
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # onnxruntime-genai itself reports a broken config when it loads the folder


def resolve(folder: Path, threads: Optional[int] = None) -> dict:
    """{setting: {"value": v, "from": where}} for the intra-op thread count and spinning. Thread count, first
    that applies: `threads` ("--threads"), genai_config.json, this host's usable cores ("default")."""
    shipped = _shipped(folder)
    if threads is not None:
        t = {"value": int(threads), "from": "--threads"}
    elif isinstance(shipped.get(THREADS), int) and shipped[THREADS] > 0:
        t = {"value": shipped[THREADS], "from": "genai_config.json"}
    else:
        t = {"value": host.usable_cores(), "from": "default"}
    spin = ({"value": str(shipped[SPINNING]), "from": "genai_config.json"} if SPINNING in shipped
            else {"value": "1", "from": "default"})
    return {THREADS: t, SPINNING: spin}


def values(settings: dict) -> dict:
    """{setting: value}, as onnxruntime-genai's session_options take them."""
    return {k: s["value"] for k, s in settings.items()}


def overlay(settings: dict) -> str:
    """The genai_config overlay (JSON) that applies the settings not already in genai_config.json."""
    so = {k: s["value"] for k, s in settings.items() if s["from"] != "genai_config.json"}
    return json.dumps({"model": {"decoder": {"session_options": so}}})


def threads(settings: dict) -> int:
    return settings[THREADS]["value"]


def one_line(settings: dict) -> str:
    """'2 intra-op threads (default), spinning 1 (genai_config.json)' for terminals and report.md."""
    t, s = settings[THREADS], settings[SPINNING]
    return f"{t['value']} intra-op thread{'s' if t['value'] != 1 else ''} ({t['from']}), spinning {s['value']} ({s['from']})"
