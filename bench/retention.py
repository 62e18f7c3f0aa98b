"""What each decoder recipe trades: its task metric, retention on the shipped general set, and drift from the base,
before replay (data.replay.fraction=0) and after (the recipe as shipped).

    python bench/retention.py --recipes chat-lora,classify,qa --out /tmp/ret [--before torch|none]
    python bench/retention.py --recipes chat-lora --out /tmp/ret --after none --before none \
        --variant "r8=method.r=8;method.alpha=16" --variant lr1e-3=train.lr=1e-3     # a sweep over the shipped recipe

after:  `toolchain edge --recipe R --out OUT` (the stage cache reuses what an earlier run built under OUT): base
        torch, tuned torch and the cpu-int4 artifact, from the artifact's report.json
before: `toolchain finetune --recipe R --set data.replay.fraction=0 --out OUT/R-no-replay`: base and tuned torch
        (the torch figures are what replay changes; the artifact follows its tuned model, see chat-lora's comments)

variant LABEL=KEY=V[;KEY=V]: `toolchain finetune --recipe R --set KEY=V ... --out OUT/R-LABEL`, torch only: the
        shipped recipe (replay included) with those keys changed, to choose rank, targets and learning rate
edge-variant LABEL=KEY=V[;KEY=V]: `toolchain edge --recipe R --set KEY=V ... --out OUT/R-LABEL`: the same through
        the artifact and its gates, for settings that only int4 tells apart (quantization, a learning rate)

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

import yaml

from provenance import REPO, fields

KEYS = ("retention", "retention_items", "drift_top1_agreement", "drift_mean_kl", "perplexity")


def toolchain(*args: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "toolchain", *args], cwd=REPO).returncode
    return rc, round(time.perf_counter() - t0, 1)


def figures(scores: dict, metric: str) -> dict:
    return {"metric": scores.get(metric), **{k: scores[k] for k in KEYS if k in scores}}


def set_args(sets: tuple[str, ...]) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def settings(rec: dict) -> dict:
    """The keys a row is labelled with, from a resolved recipe: replay, int8 projections, rank, lr, steps."""
    return {"replay": rec["data"]["replay"]["fraction"], "int8": rec["quantize"].get("int8") or [],
            "lora_r": rec["method"]["r"], "lr": rec["train"]["lr"], "max_steps": rec["train"]["max_steps"]}


def built_described(recipe: str, out: Path) -> dict:
    """What the artifact under OUT was built with (its manifest's recipe); {} when there is none."""
    man = next(out.glob(f"*-{recipe}/cpu-int4/manifest.json"), None)
    return settings(json.loads(man.read_text())["recipe"]) if man else {}


def after(recipe: str, out: Path, sets: tuple[str, ...] = ()) -> dict:
    cmd = ["edge", "--recipe", recipe, *set_args(sets), "--out", str(out)]
    rc, seconds = toolchain(*cmd)
    rep_file = next((out).glob(f"*-{recipe}/cpu-int4/report.json"), None)
    if rep_file is None:
        return {"command": "toolchain " + " ".join(cmd), "exit": rc, "error": "no report.json"}
    rep = json.loads(rep_file.read_text())
    metric, ref = rep["metric"], rep["reference"]
    return {"command": "toolchain " + " ".join(cmd), "exit": rc, "seconds": seconds, "status": rep["status"],
            "settings": built_described(recipe, out),
            "metric": metric, "base_torch": figures(ref["torch_base"], metric),
            "tuned_torch": figures(ref["torch_tuned"], metric), "artifact": figures(rep["measured"], metric),
            "gates": rep["gates"], "size_mb": rep["measured"].get("size_mb")}


def before(recipe: str, model: str, out: Path, sets: tuple[str, ...] = ("data.replay.fraction=0",),
           label: str = "no-replay") -> dict:
    folder = out / f"{recipe}-{label}"
    cmd = ["finetune", "--model", model, "--recipe", recipe, *set_args(sets), "--out", str(folder)]
    rc, seconds = (0, 0.0) if (folder / "metrics.json").is_file() else toolchain(*cmd)
    if not (folder / "metrics.json").is_file():
        return {"command": "toolchain " + " ".join(cmd), "exit": rc, "error": "no metrics.json"}
    m = json.loads((folder / "metrics.json").read_text())
    return {"command": "toolchain " + " ".join(cmd), "exit": rc, "seconds": seconds, "metric": m["metric"],
            "settings": settings(yaml.safe_load((folder / "recipe.yaml").read_text())),
            "base_torch": figures(m["base"], m["metric"]), "tuned_torch": figures(m["tuned"], m["metric"])}


def _f(v, spec=".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "—"


def _described(s: dict) -> str:
    """' (replay 0.5, int8 qkv_proj+o_proj, ...)' for a row's label; '' when not recorded."""
    text = ", ".join(f"{k} {'+'.join(v) if isinstance(v, list) else v}" for k, v in s.items() if v not in ([], None))
    return f" ({text})" if text else ""


def markdown(res: dict) -> str:
    h = res["host"]
    lines = [f"# Retention by recipe ({res['date']})", "",
             f"CPU: {h['cpu']} ({' '.join(h['isa'])}), {h['cores']} cores. Commands (commit): "
             + "; ".join(sorted({f"`{r.get('command', res['command'])}` ({r.get('commit', res['commit'])})"
                                 for r in res["recipes"].values()})) + ".", "",
             "Task metric and retention (48 general questions under a generic system prompt, fraction right) for base "
             "torch / tuned torch / cpu-int4; drift: the tuned model's top-1 agreement with the base and mean KL on "
             "general text. Before = no replay (`--set data.replay.fraction=0`, torch only), after = `toolchain edge` "
             "at the settings the row names (each run's resolved recipe).", "",
             "| recipe | metric | run | task metric | retention | retention / base | drift top-1, KL | gates |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["recipes"].items():
        rows = [(f"earlier, {e.get('commit')}", e) for e in r.get("earlier", [])]
        rows += [("before", r.get("before")), ("after", r.get("after"))] + sorted(r.get("variants", {}).items())
        for label, x in [(lb + _described((x or {}).get("settings", {})), x) for lb, x in rows]:
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
    variants = [f"- {name} {label}: `{v['command']}` ({v.get('commit')})" for name, r in res["recipes"].items()
                for label, v in sorted(r.get("variants", {}).items())]
    if variants:
        lines += ["", "Variants (the shipped recipe with the keys set; `finetune`: torch only, `edge`: with the "
                      "artifact and its gates):", *variants]
    return "\n".join(lines + [""])


def variants(specs: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """'LABEL=KEY=V;KEY=V' -> (LABEL, ('KEY=V', 'KEY=V'))."""
    return [(label, tuple(sets.split(";"))) for label, _, sets in (v.partition("=") for v in specs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="chat-lora,classify,qa")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--before", choices=("torch", "none"), default="torch")
    ap.add_argument("--after", choices=("edge", "none"), default="edge")
    ap.add_argument("--variant", action="append", default=[], metavar="LABEL=KEY=V[;KEY=V]",
                    help="a torch-only fine-tune of the shipped recipe with these keys set (repeatable)")
    ap.add_argument("--edge-variant", action="append", default=[], metavar="LABEL=KEY=V[;KEY=V]",
                    help="the same through `toolchain edge`: the artifact and its gates (repeatable)")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    a = ap.parse_args()
    date = datetime.date.today().isoformat()
    stem = a.results / f"retention-recipes-{date}"
    # a later run the same day adds its recipes to the file (each recipe keeps the commit and command it ran under)
    res = json.loads(stem.with_suffix(".json").read_text()) if stem.with_suffix(".json").is_file() else {"recipes": {}}
    run = {"date": date, **fields()}
    res.update(run)
    for name in a.recipes.split(","):
        r = res["recipes"].setdefault(name, {})
        if a.after == "edge":
            prev, prev_commit = r.get("after"), r.get("commit")
            r.update(commit=run["commit"], command=run["command"], after=after(name, a.out.resolve()))
            if prev and prev.get("settings") != r["after"].get("settings"):  # an earlier setting stays on record
                r.setdefault("earlier", []).append({**prev, "commit": prev_commit})
        if a.before == "torch":
            r["before"] = before(name, a.model, a.out.resolve())
        for label, sets in variants(a.variant):
            r.setdefault("variants", {})[label] = {**before(name, a.model, a.out.resolve(), sets, label),
                                                   "commit": run["commit"]}
        for label, sets in variants(a.edge_variant):
            r.setdefault("variants", {})[label] = {**after(name, a.out.resolve() / f"{name}-{label}", sets),
                                                   "commit": run["commit"]}
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(res))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
