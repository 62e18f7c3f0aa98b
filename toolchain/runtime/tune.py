"""`toolchain tune`: measure decode and prefill speed for each session setting on this device, keep the fastest
decode in the artifact's device_profile.json, which validate, chat and generate then apply. No torch.

Spinning is the setting that needs a device: on an idle 2-core CPU, spinning intra-op threads decoded 242 tok/s
against 145 without; on the same CPU shared at load 3-5, 41 against 78 (README). The thread count the same way.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from toolchain.runtime import genai, host, manifest, session
from toolchain.runtime.contracts import DeviceProfile
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.manifest import PROFILE
from toolchain.runtime.validate import eval_rows, latency, pick_provider


def default_threads() -> list[int]:
    """1, the powers of two below this host's usable cores, and all of them."""
    cores = host.usable_cores()
    return sorted({1, cores, *(2 ** i for i in range(1, cores.bit_length()) if 2 ** i < cores)})


def tune(folder: Path, threads: list[int], spinning: list[str], new_tokens: int = 64, runs: int = 5,
         progress: Optional[Callable[[str], None]] = None) -> dict:
    """Time every (threads, spinning) pair on the held-out latency prompt (validate's latency: a warm-up, then
    `runs` greedy runs of `new_tokens`), write device_profile.json with the fastest decode, and return it."""
    folder = Path(folder)
    man = manifest.verify(folder)
    if man.get("model_card", {}).get("kind") == "encoder":
        raise ToolchainError(f"{folder}: an encoder artifact (plain ONNX Runtime); tune sets onnxruntime-genai "
                             "session options, for decoder artifacts")
    target = man["target"]
    provider, note = pick_provider(target)
    if provider is None or note:
        raise ToolchainError(f"{folder}: {note}; tune on a host with the artifact's EP")
    options = target.get("provider_options") if provider != "cpu" else None
    measured, prompt = [], None
    for t in threads:
        for s in spinning:
            settings = session.resolve(folder, t, s, profile=False)
            if progress:
                progress(f"{t} thread(s), spinning {s}")
            model, tok = genai.load(folder, provider, options, settings)
            if prompt is None:
                row = eval_rows(folder, None, tok)[0]
                prompt = row.get("prompt_ids") or row["input_ids"]
            lat = latency(model, prompt, new_tokens=new_tokens, runs=runs)
            del model, tok  # its thread pool goes with it before the next setting starts its own
            measured.append({session.THREADS: t, session.SPINNING: s, "decode_tok_s_p50": lat["decode_tok_s_p50"],
                             "prefill_tok_s": lat["prefill_tok_s"], "ttft_ms_p50": lat["ttft_ms_p50"],
                             "prompt_tokens": lat["prompt_tokens"], "new_tokens": new_tokens, "runs": runs})
    best = max(measured, key=lambda m: m["decode_tok_s_p50"])
    profile = DeviceProfile.model_validate({
        "session_options": {session.THREADS: best[session.THREADS], session.SPINNING: best[session.SPINNING]},
        "measured": measured, "host": host.describe(best[session.THREADS]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}).out()
    tmp = folder / f".{PROFILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(profile, indent=2) + "\n")
        os.replace(tmp, folder / PROFILE)  # a reader never sees half a profile
    finally:
        tmp.unlink(missing_ok=True)  # or the manifest check would find an unlisted file
    return profile
