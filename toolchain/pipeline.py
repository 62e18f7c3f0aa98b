"""The mission as code: take a language model to a folder you can copy to a device.

    finetune  ->  merge  ->  export  ->  quantize  ->  validate  ->  package
    (PEFT)        (HF)       (ONNX)      (int4/int8)   (ORT)         (artifact + report)

Each stage is one module with one entry function, and each writes one folder under
artifacts/<model>-<recipe>/. Built so far: finetune and merge. Export, quantize, validate and package are the
next stages (they are not run, and `edge` says so rather than pretend).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .catalog import load_recipe
from .finetune import finetune
from .merge import merge

NOT_BUILT_YET = ("export", "quantize", "validate", "package")


def edge(model: Optional[str], recipe: str, out: Path, max_steps: Optional[int] = None,
         model_path: Optional[str] = None, trust_remote_code: bool = False) -> dict:
    """Run every built stage for one model and recipe; returns each stage's summary."""
    rec, _ = load_recipe(recipe)
    model = model or rec.model
    run = Path(out) / f"{model}-{rec.name}"
    tuned = finetune(model, recipe, run / "finetune", max_steps=max_steps, model_path=model_path,
                     trust_remote_code=trust_remote_code)
    merged = merge(model, run / "finetune", run / "merged", model_path=model_path, trust_remote_code=trust_remote_code)
    return {"run": str(run), "finetune": tuned, "merge": merged, "not_built_yet": list(NOT_BUILT_YET)}
