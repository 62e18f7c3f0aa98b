"""Which execution providers this host's ONNX Runtime (and onnxruntime-genai) can run. No torch."""
from __future__ import annotations

from typing import Optional

# onnxruntime-genai's own build flags, where it has one (the EP must be in both ORT and onnxruntime-genai)
_OG_CHECK = {"cuda": "is_cuda_available", "dml": "is_dml_available", "webgpu": "is_webgpu_available"}


def ep_available(ep: str, provider: Optional[str] = None) -> bool:
    """True when this host's ONNX Runtime (and onnxruntime-genai, where it says) can run the EP."""
    import onnxruntime as ort

    if ep not in ort.get_available_providers():
        return False
    check = _OG_CHECK.get(provider or "")
    if check:
        import onnxruntime_genai as og

        return bool(getattr(og, check, lambda: True)())
    return True
