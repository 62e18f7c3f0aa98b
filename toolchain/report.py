"""report.md and report.png for an artifact; the plot compares every target built so far for the run."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


def _metric(rep: dict):
    """The recipe's task metric when the report carries it (perplexity has its own row), else exact match."""
    name = rep.get("metric", "exact_match")
    return None if name == "perplexity" or name not in rep["measured"] else name


def markdown(rep: dict, siblings: dict[str, dict]) -> str:
    if rep.get("kind") == "encoder":
        return markdown_encoder(rep)
    m, ref = rep["measured"], rep["reference"]
    metric = _metric(rep)
    lines = [f"# {rep['target']} — {rep['artifact']}", "",
             f"Validated with ONNX Runtime GenAI on the `{rep['provider']}` execution provider "
             f"({'all gates passed' if rep['passed'] else 'GATES MISSED'}).", "",
             "| figure | value |", "|---|---|",
             f"| decode tok/s (p50) | {_fmt(m['decode_tok_s_p50'], '.1f')} |",
             f"| prefill tok/s | {_fmt(m['prefill_tok_s'], '.1f')} |",
             f"| TTFT p50 / p95 (ms) | {_fmt(m['ttft_ms_p50'], '.1f')} / {_fmt(m['ttft_ms_p95'], '.1f')} |",
             f"| peak RSS (MB) | {_fmt(m['peak_rss_mb'], '.0f')} |",
             f"| model size (MB) | {_fmt(m['size_mb'], '.1f')} |",
             f"| held-out perplexity | {_fmt(m['perplexity'])} (torch tuned {_fmt(ref.get('torch_tuned', {}).get('perplexity'))}, "
             f"fp32 ONNX {_fmt(ref.get('onnx_fp32', {}).get('perplexity'))}) |"]
    from .runtime.metrics import FAMILIES

    for k in (FAMILIES.get(metric, [metric]) if metric else []):  # the headline metric, then its companions
        lines.append(f"| {k} | {_fmt(m.get(k))} (torch base {_fmt(ref.get('torch_base', {}).get(k))}, "
                     f"torch tuned {_fmt(ref.get('torch_tuned', {}).get(k))}, fp32 ONNX {_fmt(ref.get('onnx_fp32', {}).get(k))}) |")
    if "token_agreement_fp32" in m:
        lines.append(f"| greedy token agreement with fp32 ONNX | {_fmt(m['token_agreement_fp32'])} |")
    lines += ["", "## Gates", ""] + [f"- {'PASS' if g['passed'] else 'MISS'} `{g['gate']}`: {_fmt(g['value'])} "
                                     f"(limit {g['limit']})" for g in rep["gates"]] + (["- none set"] if not rep["gates"] else [])
    lines += ["", "## Targets built so far", "", "| target | size MB | decode tok/s | perplexity | metric |", "|---|---|---|---|---|"]
    for name, r in sorted(siblings.items()):
        s = r["measured"]
        lines.append(f"| {name} | {_fmt(s['size_mb'], '.1f')} | {_fmt(s['decode_tok_s_p50'], '.1f')} | "
                     f"{_fmt(s['perplexity'])} | {_fmt(s.get(metric)) if metric else 'n/a'} |")
    return "\n".join(lines + ["", "![targets](report.png)", ""])


def markdown_encoder(rep: dict) -> str:
    """An encoder artifact: latency per sequence and the task figures beside base and tuned torch."""
    m, ref = rep["measured"], rep["reference"]
    lines = [f"# {rep['target']} — {rep['artifact']}", "",
             f"Validated with ONNX Runtime and `tokenizers` ({'all gates passed' if rep['passed'] else 'GATES MISSED'}).",
             "", "| figure | value |", "|---|---|",
             f"| latency per sequence p50 / p95 (ms, batch 1, tokenizer included) | {_fmt(m['latency_ms_p50'], '.2f')} / "
             f"{_fmt(m['latency_ms_p95'], '.2f')} |",
             f"| peak RSS (MB) | {_fmt(m['peak_rss_mb'], '.0f')} |", f"| model size (MB) | {_fmt(m['size_mb'], '.1f')} |",
             "", "| figure | torch base (random head) | torch tuned | fp32 ONNX | this artifact |", "|---|---|---|---|---|"]
    for k in rep.get("figures", []):
        lines.append(f"| {k} | {_fmt(ref.get('torch_base', {}).get(k))} | {_fmt(ref.get('torch_tuned', {}).get(k))} | "
                     f"{_fmt(ref.get('onnx_fp32', {}).get(k))} | {_fmt(m.get(k))} |")
    lines += ["", "## Gates", ""] + [f"- {'PASS' if g['passed'] else 'MISS'} `{g['gate']}`: {_fmt(g['value'])} "
                                     f"(limit {g['limit']})" for g in rep["gates"]] + (["- none set"] if not rep["gates"] else [])
    return "\n".join(lines + [""])


def plot(siblings: dict[str, dict], path: Path, metric: str = "exact_match") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(siblings)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (key, label) in zip(axes, [("size_mb", "size (MB)"), ("decode_tok_s_p50", "decode tok/s"),
                                      (metric, "task metric")]):
        ax.bar(names, [siblings[n]["measured"].get(key, 0) or 0 for n in names], color="#4a7ab5")
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(artifact: Path, rep: dict) -> None:
    """report.md and report.png beside the report.json that `toolchain validate` wrote."""
    artifact = Path(artifact)
    siblings = {p.parent.name: json.loads(p.read_text()) for p in artifact.parent.glob("*/report.json")}
    (artifact / "report.md").write_text(markdown(rep, siblings))
    if rep.get("kind") != "encoder":
        plot(siblings, artifact / "report.png", _metric(rep) or "perplexity")


def scenario_table(out: Path) -> str:
    """The README's scenario table from every artifact under `out` (the report.json that validate wrote):
    base torch / tuned torch / fp32 ONNX / artifact for each recipe's headline metric, and the gates."""
    from .runtime.metrics import LOWER_IS_BETTER

    lines = ["| recipe | model | target | metric | base torch | tuned torch | fp32 ONNX | artifact | artifact / tuned | "
             "speed | gates |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(Path(out).glob("*/*/report.json")):
        rep = json.loads(p.read_text())
        man = json.loads((p.parent / "manifest.json").read_text())
        metric, ref, m = rep.get("metric", "exact_match"), rep["reference"], rep["measured"]
        base, tuned = ref.get("torch_base", {}).get(metric), ref.get("torch_tuned", {}).get(metric)
        fp32, art = ref.get("onnx_fp32", {}).get(metric), m.get(metric)
        better = (tuned < base) if metric in LOWER_IS_BETTER else (tuned > base)
        speed = (f"{m['latency_ms_p50']:.1f} ms/seq p50" if rep.get("kind") == "encoder"
                 else f"{m['decode_tok_s_p50']:.0f} tok/s")
        gates = "pass" if rep["passed"] else "MISS " + ", ".join(g["gate"] for g in rep["gates"] if not g["passed"])
        ratio = art / tuned if isinstance(art, (int, float)) and tuned else None
        lines.append(f"| {man['recipe']['name']} | {man['model_card']['name']} | {rep['target']} | {metric} | "
                     f"{_fmt(base)} | {_fmt(tuned)}{'' if better else ' (not better)'} | {_fmt(fp32)} | {_fmt(art)} | "
                     f"{_fmt(ratio)} | {speed} | {gates} |")
    return "\n".join(lines)
