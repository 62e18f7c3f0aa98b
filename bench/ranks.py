"""One process against N DeepSpeed ranks on the same recipe: does a scaled-out run reach the same held-out metric?

    .venv/bin/python bench/ranks.py [--recipe chat-lora] [--nproc 2] [--zero 2]     # trains both, then compares
    .venv/bin/python bench/ranks.py --runs runs/single runs/ds2                      # compares two finished runs

Both runs use the recipe as shipped; the recipe's batch_size is the global batch, so the ranks take the same steps.
Writes bench/results/ranks-<date>.json: each run's held-out figures, training time, and the per-step loss gap.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train(recipe: str, model: str, out: Path, nproc: int, zero: int) -> None:
    cmd = [sys.executable, "-m", "toolchain.cli", "finetune", "--model", model, "--recipe", recipe, "--out", str(out)]
    if nproc > 1:
        cmd += ["--launcher", "deepspeed", "--nproc", str(nproc), "--zero", str(zero)]
    subprocess.run(cmd, check=True, cwd=REPO)


def summary(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    losses = [json.loads(x)["loss"] for x in (run / "loss_log.jsonl").read_text().splitlines()]
    return {"run": str(run), "train": m["train"], "tuned": {k: v for k, v in m["tuned"].items() if k != "samples"},
            "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="chat-lora")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "runs" / "ranks"))
    ap.add_argument("--runs", nargs=2, default=None, help="compare two finished runs (one process, then N ranks)")
    a = ap.parse_args()
    if a.runs:
        single, multi = map(Path, a.runs)
    else:
        single, multi = Path(a.out) / "single", Path(a.out) / f"ds{a.nproc}"
        train(a.recipe, a.model, single, 1, a.zero)
        train(a.recipe, a.model, multi, a.nproc, a.zero)
    s, m = summary(single), summary(multi)
    gap = max(abs(x - y) for x, y in zip(s["losses"], m["losses"]))
    from provenance import fields

    res = {**fields(), "load_avg_at_end": os.getloadavg(), "one_process": s,
           f"{m['train']['ranks']}_ranks": m, "max_step_loss_gap": gap}
    metric = next(k for k in s["tuned"] if k not in ("eval_loss", "perplexity", "eval_tokens", "eval_examples"))
    n = s["tuned"].get("eval_examples")
    print(f"{metric}: one process {s['tuned'][metric]:.3f}, {m['train']['ranks']} ranks (ZeRO-{m['train']['zero']}) "
          f"{m['tuned'][metric]:.3f} on {n} held-out examples; perplexity {s['tuned']['perplexity']:.3f} vs "
          f"{m['tuned']['perplexity']:.3f}; largest per-step loss gap {gap:.4f}")
    out = REPO / "bench/results" / f"ranks-{datetime.date.today()}.json"
    out.write_text(json.dumps(res, indent=2))
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
