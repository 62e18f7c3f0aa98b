"""Resumable training checkpoints in safetensors + JSON (no pickles): trained weights, AdamW moments, the torch
RNG state, the loss log and the step. A checkpoint carries the key of the run that wrote it and is only resumed
by a run with the same key (same model, recipe, data and ranks)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from toolchain.runtime.fsutil import atomic_dir


class Checkpoint:
    def __init__(self, folder: Path, key: str):
        self.folder, self.key = Path(folder), key

    def save(self, step: int, net, opt, log: list, results: dict) -> None:
        params = _trained(net)
        weights = {n: p.detach().contiguous().clone() for n, p in params}
        moments = {}
        for i, (_, p) in enumerate(params):
            for k, v in opt.state.get(p, {}).items():
                moments[f"{i}.{k}"] = v.detach().reshape(-1).clone() if k == "step" else v.detach().contiguous().clone()
        moments["rng"] = torch.get_rng_state()
        with atomic_dir(self.folder) as tmp:
            save_file(weights, str(tmp / "trained.safetensors"))
            save_file(moments, str(tmp / "optimizer.safetensors"))
            (tmp / "state.json").write_text(json.dumps({"key": self.key, "step": step, "log": log, "results": results}))

    def load(self) -> Optional[dict]:
        """The saved state if there is one for this run; a stale checkpoint (other inputs) is removed."""
        f = self.folder / "state.json"
        if not f.is_file():
            return None
        state = json.loads(f.read_text())
        if state.get("key") != self.key:
            print(f"{self.folder}: checkpoint from a run with other inputs; starting afresh", flush=True)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None
        return state

    def restore(self, state: dict, net, opt) -> tuple[int, list]:
        params = _trained(net)
        weights = load_file(str(self.folder / "trained.safetensors"))
        moments = load_file(str(self.folder / "optimizer.safetensors"))
        with torch.no_grad():
            for n, p in params:
                p.copy_(weights[n])
        for i, (_, p) in enumerate(params):
            st = {k.split(".", 1)[1]: v for k, v in moments.items() if k.split(".", 1)[0] == str(i)}
            if st:
                st["step"] = st["step"].reshape(())
                opt.state[p] = st
        torch.set_rng_state(moments["rng"])
        return state["step"], state["log"]


def _trained(net) -> list:
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]
