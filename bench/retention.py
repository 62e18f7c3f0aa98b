"""What each decoder recipe trades: its task metric, retention on the shipped general set, and drift from the base,
before replay (data.replay.fraction=0) and after (the recipe as shipped).

    python bench/retention.py --recipes chat-lora,classify,qa --out /tmp/ret [--before torch|none]

after:  `toolchain edge --recipe R --out OUT` (the stage cache reuses what an earlier run built under OUT): base
        torch, tuned torch and the cpu-int4 artifact, from the artifact's report.json
before: `toolchain finetune --recipe R --set data.replay.fraction=0 --out OUT/R-no-replay`: base and tuned torch
        (the torch figures are what replay changes; the artifact follows its tuned model, see chat-lora's comments)

Writes bench/results/retention-recipes-<date>.json and .md with the commit, host and command.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from provenance import REPO, fields

KEYS = ("retention", "retention_items", "drift_top1_agreement", "drift_mean_kl", "perplexity")


def toolchain(*args: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "toolchain", *args], cwd=REPO).returncode
    return rc, round(time.perf_counter() - t0, 1)


def figures(scores: dict, metric: str) -> dict:
    return {"metric": scores.get(metric), **{k: scores[k] for k in KEYS if k in scores}}


def after(recipe: str, out: Path) -> dict:
    cmd = ["edge", "--recipe", recipe, "--out", str(out)]
    rc, seconds = toolchain(*cmd)
    rep_file = next((out).glob(f"*-{recipe}/cpu-int4/report.json"), None)
    if rep_file is None:
        return {"command": "toolchain " + " ".join(cmd), "exit": rc, "error": "no report.json"}
    rep = json.loads(rep_file.read_text())
    metric, ref = rep["metric"], rep["reference"]
    return {"command": "toolchain " + " ".join(cmd), "exit": rc, "seconds": seconds, "status": rep["status"],
            "metric": metric, "base_torch": figures(ref["torch_base"], metric),
            "tuned_torch": figures(ref["torch_tuned"], metric), "artifact": figures(rep["measured"], metric),
            "gates": rep["gates"], "size_mb": rep["measured"].get("size_mb")}


def before(recipe: str, model: str, out: Path) -> dict:
    folder = out / f"{recipe}-no-replay"
    cmd = ["finetune", "--model", model, "--recipe", recipe, "--set", "data.replay.fraction=0", "--out", str(folder)]
    rc, seconds = (0, 0.0) if (folder / "metrics.json").is_file() else toolchain(*cmd)
    if not (folder / "metrics.json").is_file():
        return {"command": "toolchain " + " ".join(cmd), "exit": rc, "error": "no metrics.json"}
    m = json.loads((folder / "metrics.json").read_text())
    return {"command": "toolchain " + " ".join(cmd), "exit": rc, "seconds": seconds, "metric": m["metric"],
            "base_torch": figures(m["base"], m["metric"]), "tuned_torch": figures(m["tuned"], m["metric"])}


def _f(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "—"


def markdown(res: dict) -> str:
    h = res["host"]
    lines = [f"# Retention by recipe ({res['date']})", "",
             f"CPU: {h['cpu']} ({' '.join(h['isa'])}), {h['cores']} cores. Commands (commit): "
             + "; ".join(sorted({f"`{r.get('command', res['command'])}` ({r.get('commit', res['commit'])})"
                                 for r in res["recipes"].values()})) + ".", "",
             "Task metric and retention (48 general questions under a generic system prompt, fraction right) for base "
             "torch / tuned torch / cpu-int4; drift: the tuned model's top-1 agreement with the base and mean KL on "
             "general text. Before = no replay (`--set data.replay.fraction=0`, torch only), after = as shipped.", "",
             "| recipe | metric | run | task metric | retention | retention / base | drift top-1, KL | gates |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["recipes"].items():
        for label in ("before", "after"):
            x = r.get(label)
            if not x or "error" in x:
                lines.append(f"| {name} | | {label} | {x and x.get('error') or 'not run'} | | | | |")
                continue
            b, t, a = x["base_torch"], x["tuned_torch"], x.get("artifact", {})
            task = " / ".join(_f(v.get("metric")) for v in (b, t, a) if v)
            ret = " / ".join(_f(v.get("retention")) for v in (b, t, a) if v)
            last = a or t
            frac = _f(last["retention"] / b["retention"]) if b.get("retention") else "—"
            gates = "; ".join(f"{g['gate']} {_f(g['value'])} {'ok' if g['passed'] else 'MISSED'}"
                              for g in x.get("gates", []) if g["gate"] in ("min_retention", "min_metric_fraction"))
            lines.append(f"| {name} | {x['metric']} | {label} | {task} | {ret} | {frac} | "
                         f"{_f(t.get('drift_top1_agreement'))}, {_f(t.get('drift_mean_kl'))} | {gates or '—'} |")
    return "\n".join(lines + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="chat-lora,classify,qa")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--before", choices=("torch", "none"), default="torch")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args()
    date = datetime.date.today().isoformat()
    stem = a.results / f"retention-recipes-{date}"
    # a later run the same day adds its recipes to the file (each recipe keeps the commit and command it ran under)
    res = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {"recipes": {}}
    run = {"date": date, **fields()}
    res.update(run)
    for name in a.recipes.split(","):
        r = res["recipes"][name] = {"commit": run["commit"], "command": run["command"],
                                    "after": after(name, a.out.resolve())}
        if a.before == "torch":
            r["before"] = before(name, a.model, a.out.resolve())
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(res))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
