"""Stage 3, encoders: Optimum main_export (text-classification / token-classification), then logit parity with
torch on probe rows."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from toolchain.hf.encoder import TASKS, head_class, torch_forward
from toolchain.runtime import encoder as rt
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir


def export(model_dir: Path, task: str, out: Path, probe: list[dict], max_length: int) -> dict:
    """Optimum ONNX export of the merged folder, then max |logit diff| against torch on the probe rows."""
    from optimum.exporters.onnx import main_export

    t0 = time.time()
    with atomic_dir(Path(out)) as tmp:
        main_export(str(model_dir), output=tmp, task=TASKS[task][0], do_validation=False, library_name="transformers")
        if not (tmp / rt.MODEL).is_file():
            raise ToolchainError(f"Optimum wrote no {rt.MODEL} for {model_dir}")
        tok = rt.load_tokenizer(Path(model_dir) / rt.TOKENIZER, max_length)
        b = rt.encode(tok, probe, task)
        want = torch_forward(head_class(task).from_pretrained(model_dir))(b)
        got = rt.ort_forward(tmp / rt.MODEL)(b)
        diff = float(np.abs(want - got).max())
        if diff > 1e-3:
            raise ToolchainError(f"ONNX export of {model_dir} differs from torch by {diff:.2e} in the logits (limit 1e-3)")
        rep = {"exporter": "optimum", "task": TASKS[task][0], "max_abs_logit_diff": diff,
               "argmax_agreement": float((want.argmax(-1) == got.argmax(-1)).mean()), "seconds": round(time.time() - t0, 1)}
        (tmp / "export_report.json").write_text(json.dumps(rep, indent=2))
    return rep


