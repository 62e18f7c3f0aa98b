"""The ONNX Runtime session settings a run uses, and where each came from. No torch.

onnxruntime-genai runs one intra-op thread unless genai_config.json says otherwise (it ran one on a 2-core AVX2
host: 50 tok/s decode against 81 with two). So a run defaults to this host's usable cores; the artifact's
device_profile.json (what `toolchain tune` measured fastest on this device) or an explicit --threads say otherwise.
The settings reach onnxruntime-genai as an overlay on the config it read (og.Config.overlay): no file in the
artifact is edited, so its manifest hashes still hold.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from toolchain.runtime import host
from toolchain.runtime.contracts import DeviceProfile
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.manifest import PROFILE

THREADS = "intra_op_num_threads"
SPINNING = "session.intra_op.allow_spinning"  # an ONNX Runtime session config entry; its default is "1" (spin)


def _shipped(folder: Path) -> dict:
    """The session_options genai_config.json ships with ({} for a folder without one)."""
    path = Path(folder) / "genai_config.json"
    try:
        return json.loads(path.read_text())["model"]["decoder"].get("session_options", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # onnxruntime-genai itself reports a broken config when it loads the folder


def read_profile(folder: Path) -> Optional[DeviceProfile]:
    """The artifact's device_profile.json, validated: only the whitelisted session options, with sane values.
    None when there is none."""
    path = Path(folder) / PROFILE
    if not path.is_file():
        return None
    fix = f"rerun `toolchain tune {folder}` or delete {path}"
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ToolchainError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(raw, dict):
        raise ToolchainError(f"{path}: expected a JSON object; {fix}")
    try:
        return DeviceProfile.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = (f"{THREADS}, {SPINNING}" if key.startswith("session_options.")
                       else ", ".join(DeviceProfile.model_fields))
            msg = f"unknown key (allowed: {allowed})"
        else:
            msg = err["msg"]
        raise ToolchainError(f"{path}: key '{key}': {msg}; {fix}") from None


def _host_warning(profile: DeviceProfile) -> Optional[str]:
    tuned, here = profile.host, host.describe()
    if tuned and (tuned.get("cpu"), tuned.get("cores")) != (here["cpu"], here["cores"]):
        return (f"{PROFILE} was tuned on {tuned.get('cpu')} with {tuned.get('cores')} cores, this host is "
                f"{here['cpu']} with {here['cores']}: rerun `toolchain tune` here")
    return None


def resolve(folder: Path, threads: Optional[int] = None, spinning: Optional[str] = None,
            profile: bool = True) -> dict:
    """{setting: {"value": v, "from": where}} for the intra-op thread count and spinning; the first that applies:
    the explicit argument ("--threads" / "--spinning"), the artifact's device_profile.json ("profile", unless
    profile=False), genai_config.json, then the default: this host's usable cores, and ONNX Runtime's spinning.
    A profile tuned on another CPU or core count adds a "warning" to the thread entry."""
    shipped = _shipped(folder)
    prof = read_profile(folder) if profile else None
    tuned = prof.session_options.out() if prof else {}
    if threads is not None:
        t = {"value": int(threads), "from": "--threads"}
    elif THREADS in tuned:
        t = {"value": tuned[THREADS], "from": "profile"}
        warning = _host_warning(prof)
        if warning:
            t["warning"] = warning
    elif isinstance(shipped.get(THREADS), int) and shipped[THREADS] > 0:
        t = {"value": shipped[THREADS], "from": "genai_config.json"}
    else:
        t = {"value": host.usable_cores(), "from": "default"}
    if spinning is not None:
        s = {"value": str(spinning), "from": "--spinning"}
    elif SPINNING in tuned:
        s = {"value": tuned[SPINNING], "from": "profile"}
    elif SPINNING in shipped:
        s = {"value": str(shipped[SPINNING]), "from": "genai_config.json"}
    else:
        s = {"value": "1", "from": "default"}
    return {THREADS: t, SPINNING: s}


def overlay(settings: dict) -> str:
    """The genai_config overlay (JSON) that applies the settings not already in genai_config.json."""
    so = {k: s["value"] for k, s in settings.items() if s["from"] != "genai_config.json"}
    return json.dumps({"model": {"decoder": {"session_options": so}}})


def threads(settings: dict) -> int:
    return settings[THREADS]["value"]


def warnings(settings: dict) -> list[str]:
    return [s["warning"] for s in settings.values() if s.get("warning")]


def one_line(settings: dict) -> str:
    """'2 intra-op threads (default), spinning 1 (genai_config.json)' for terminals and report.md."""
    t, s = settings[THREADS], settings[SPINNING]
    return f"{t['value']} intra-op thread{'s' if t['value'] != 1 else ''} ({t['from']}), spinning {s['value']} ({s['from']})"
