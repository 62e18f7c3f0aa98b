"""report.md and report.png for an artifact (the plot compares every target built so far for the run); a decoder
artifact's model card is modelcard.py's."""
from __future__ import annotations

import json
from pathlib import Path

from toolchain.modelcard import write_model_card


def _fmt(v, spec=".3f"):
    return format(v, spec) if isinstance(v, (int, float)) else "n/a"


GGUF_EP = "llama.cpp"  # config/targets.py: the GGUF targets' `ep`


def _not_validated(rep: dict, siblings: dict[str, dict]) -> str:
    where = "llama-cpp-python installed" if rep.get("ep") == GGUF_EP else "the EP"
    return "\n".join([f"# {rep['target']} — {rep['artifact']}", "",
                      f"**{rep['reason']}.** Nothing was measured except the size ({_fmt(rep['measured']['size_mb'], '.1f')} MB); "
                      f"no gate counts as passed. Run `toolchain validate` on a host with {where}.", ""] + _siblings(siblings, None))


def _siblings(siblings: dict[str, dict], metric) -> list[str]:
    lines = ["## Targets built so far", "", "| target | size MB | decode tok/s | perplexity | metric | status |",
             "|---|---|---|---|---|---|"]
    for name, r in sorted(siblings.items()):
        s = r["measured"]
        lines.append(f"| {name} | {_fmt(s['size_mb'], '.1f')} | {_fmt(s.get('decode_tok_s_p50'), '.1f')} | "
                     f"{_fmt(s.get('perplexity'))} | {_fmt(s.get(metric)) if metric else 'n/a'} | "
                     f"{r.get('status', 'passed' if r.get('passed') else 'gates_missed')} |")
    return lines


def _host(rep: dict) -> list[str]:
    """The machine and session settings the figures were measured with (reports from before they were recorded: none)."""
    from toolchain.runtime import host, session

    lines = [f"Host: {host.one_line(rep['host'])}."] if rep.get("host") else []
    if rep.get("session"):
        lines.append(f"Session: {session.one_line(rep['session'])}.")
    return lines + [""] if lines else []


def _metric(rep: dict):
    """The recipe's task metric when the report carries it (perplexity has its own row), else exact match."""
    name = rep.get("metric", "exact_match")
    return None if name == "perplexity" or name not in rep["measured"] else name


def markdown(rep: dict, siblings: dict[str, dict], figure: bool = True) -> str:
    """report.md; figure: it links report.png."""
    if rep.get("kind") == "encoder":
        return markdown_encoder(rep)
    if not rep.get("validated", True):
        return _not_validated(rep, siblings)
    m, ref = rep["measured"], rep["reference"]
    metric = _metric(rep)
    lines = [f"# {rep['target']} — {rep['artifact']}", "",
             (f"Validated with llama.cpp ({rep.get('note')}) " if rep.get("ep") == GGUF_EP else
              f"Validated with ONNX Runtime GenAI on the `{rep['provider']}` execution provider ")
             + f"({'all gates passed' if rep['passed'] else 'GATES MISSED'}).", ""] + _host(rep) + (
             [f"Note: {rep['note']}" + "".join(f"; `{g}` not applied" for g in rep.get("gates_not_applicable", [])) + ".", ""]
             if rep.get("note") and rep.get("ep") != GGUF_EP else []) + [
             "| figure | value |", "|---|---|",
             f"| decode tok/s (p50) | {_fmt(m['decode_tok_s_p50'], '.1f')} |",
             f"| prefill tok/s | {_fmt(m['prefill_tok_s'], '.1f')} |",
             f"| TTFT p50 / p95 (ms) | {_fmt(m['ttft_ms_p50'], '.1f')} / {_fmt(m['ttft_ms_p95'], '.1f')} |",
             f"| peak RSS (MB) | {_fmt(m['peak_rss_mb'], '.0f')} |",
             f"| model size (MB) | {_fmt(m['size_mb'], '.1f')} |",
             f"| held-out perplexity | {_fmt(m['perplexity'])} (torch tuned {_fmt(ref.get('torch_tuned', {}).get('perplexity'))}, "
             f"fp32 ONNX {_fmt(ref.get('onnx_fp32', {}).get('perplexity'))}) |"]
    from toolchain.runtime.metrics import FAMILIES

    for k in (FAMILIES.get(metric, [metric]) if metric else []):  # the headline metric, then its companions
        lines.append(f"| {k} | {_fmt(m.get(k))} (torch base {_fmt(ref.get('torch_base', {}).get(k))}, "
                     f"torch tuned {_fmt(ref.get('torch_tuned', {}).get(k))}, fp32 ONNX {_fmt(ref.get('onnx_fp32', {}).get(k))}) |")
    if "token_agreement_fp32" in m:
        src = ref.get("onnx_fp32", {}).get("source", "")
        whose = "tuned torch" if "reference tokens" in src or src.startswith("torch") else "fp32 ONNX"
        lines.append(f"| greedy token agreement with {whose} | {_fmt(m['token_agreement_fp32'])} |")
    if "retention" in m:  # the general set under a generic system prompt: what the fine-tune cost outside the task
        tuned = ref.get("torch_tuned", {})
        lines += [f"| retention, {m['retention_items']} general questions | {_fmt(m['retention'])} (torch base "
                  f"{_fmt(ref.get('torch_base', {}).get('retention'))}, torch tuned {_fmt(tuned.get('retention'))}, "
                  f"fp32 ONNX {_fmt(ref.get('onnx_fp32', {}).get('retention'))}) |",
                  f"| drift from the base (torch, general text): top-1 agreement / mean KL | "
                  f"{_fmt(tuned.get('drift_top1_agreement'))} / {_fmt(tuned.get('drift_mean_kl'))} |"]
    lines += ["", "## Gates", ""] + [f"- {'PASS' if g['passed'] else 'MISS'} `{g['gate']}`: {_fmt(g['value'])} "
                                     f"(limit {g['limit']})" for g in rep["gates"]] + (["- none set"] if not rep["gates"] else [])
    if rep.get("build_stages"):
        lines += ["", "## How it was built", "", "| stage | wall s | peak RSS (MB) |", "|---|---|---|"] + [
            f"| {b['stage']} | {_fmt(b.get('seconds'), '.1f')} | {_fmt(b.get('peak_rss_mb'), '.0f')} |"
            for b in rep["build_stages"]]
    lines += [""] + _siblings(siblings, metric)
    return "\n".join(lines + (["", "![targets](report.png)", ""] if figure else [""]))


def markdown_encoder(rep: dict) -> str:
    """An encoder artifact: latency per sequence and the task figures beside base and tuned torch."""
    m, ref = rep["measured"], rep["reference"]
    lines = [f"# {rep['target']} — {rep['artifact']}", "",
             f"Validated with ONNX Runtime and `tokenizers` ({'all gates passed' if rep['passed'] else 'GATES MISSED'}).",
             ""] + ([f"Note: {rep['note']}.", ""] if rep.get("note") else []) + ["| figure | value |", "|---|---|",
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
        ax.bar(names, [siblings[n]["measured"].get(key, 0) or 0 for n in names],
               color=["#4a7ab5" if siblings[n].get("validated", True) else "#bbbbbb" for n in names])
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _siblings_of(artifact: Path, rep: dict) -> dict[str, dict]:
    """The reports of the artifacts beside this one (other targets of the same run), and this one's own. A folder
    beside it that is not an artifact, or whose report does not read, is left out: on a device, the parent folder
    is wherever the user copied the artifact."""
    out = {}
    for p in artifact.parent.glob("*/report.json"):
        if p.parent != artifact and (p.parent / "manifest.json").is_file():
            try:
                r = json.loads(p.read_text())
            except ValueError:
                continue
            if isinstance(r, dict) and isinstance(r.get("measured"), dict):
                out[p.parent.name] = r
    return {**out, artifact.name: rep}


def write_reports(artifact: Path, rep: dict) -> None:
    """report.md, and report.png where matplotlib is importable (a device may not have it: then a report.png left
    from an earlier run is removed, since it would show other figures, and report.md does not link one); for a decoder
    artifact also its model card, README.md (modelcard.py: it carries the scores, so it is written here)."""
    artifact = Path(artifact)
    siblings = _siblings_of(artifact, rep)
    png = artifact / "report.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plotted = False
        png.unlink(missing_ok=True)
    else:
        plotted = rep.get("kind") != "encoder"
        if plotted:
            plot(siblings, png, _metric(rep) or "perplexity")
    (artifact / "report.md").write_text(markdown(rep, siblings, figure=plotted))
    if rep.get("kind") != "encoder":
        write_model_card(artifact, rep)




def scenario_rows(out: Path) -> list[dict]:
    """One row per artifact under `out` (the report.json that validate wrote): base torch / tuned torch / fp32 ONNX /
    artifact for the recipe's headline metric, the speed, and the gates (numbers, None where not measured)."""
    from toolchain.runtime.metrics import LOWER_IS_BETTER

    rows = []
    for p in sorted(Path(out).glob("*/*/report.json")):
        rep = json.loads(p.read_text())
        man = json.loads((p.parent / "manifest.json").read_text())
        if rep.get("adapters") is not None:  # one base, several adapters: a row per adapter
            rows += adapter_rows(rep, man)
            continue
        metric, ref, m = rep.get("metric", "exact_match"), rep["reference"], rep["measured"]
        base, tuned = ref.get("torch_base", {}).get(metric), ref.get("torch_tuned", {}).get(metric)
        art = m.get(metric)
        encoder = rep.get("kind") == "encoder"
        rows.append({"recipe": man["recipe"]["name"], "model": man["model_card"]["name"], "target": rep["target"],
                     "metric": metric, "base_torch": base, "tuned_torch": tuned,
                     "tuned_better": None if base is None or tuned is None else
                     (tuned < base) if metric in LOWER_IS_BETTER else (tuned > base),
                     "onnx_fp32": ref.get("onnx_fp32", {}).get(metric), "artifact": art,
                     "artifact_over_tuned": art / tuned if isinstance(art, (int, float)) and tuned else None,
                     **_retention_row(ref, m),
                     "speed": m.get("latency_ms_p50") if encoder else m.get("decode_tok_s_p50"),
                     "speed_unit": "ms/seq p50" if encoder else "decode tok/s p50", "status": rep.get("status"),
                     "passed": rep.get("passed"), "missed": [g["gate"] for g in rep["gates"] if not g["passed"]]})
    return rows


def _retention_row(ref: dict, m: dict) -> dict:
    """Retention (base torch / tuned torch / artifact) and drift (mean KL) for a scenario row; None where not measured."""
    return {"retention_base": ref.get("torch_base", {}).get("retention"),
            "retention_tuned": ref.get("torch_tuned", {}).get("retention"), "retention_artifact": m.get("retention"),
            "drift_mean_kl": ref.get("torch_tuned", {}).get("drift_mean_kl")}


def scenario_table(rows: list[dict]) -> str:
    """The README's scenario table from scenario_rows."""
    lines = ["| recipe | model | target | metric | base torch | tuned torch | fp32 ONNX | artifact | artifact / tuned | "
             "retention base / tuned / artifact | drift KL | speed | gates |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = (f"{_fmt(r['speed'], '.1f')} ms/seq p50" if r["speed_unit"].startswith("ms")
                 else f"{_fmt(r['speed'], '.0f')} tok/s")
        gates = "pass" if r["passed"] else "MISS " + ", ".join(r["missed"])
        lines.append(f"| {r['recipe']} | {r['model']} | {r['target']} | {r['metric']} | {_fmt(r['base_torch'])} | "
                     f"{_fmt(r['tuned_torch'])}{'' if r['tuned_better'] is not False else ' (not better)'} | "
                     f"{_fmt(r['onnx_fp32'])} | {_fmt(r['artifact'])} | {_fmt(r['artifact_over_tuned'])} | "
                     f"{_retention_cell(r)} | {_fmt(r.get('drift_mean_kl'))} | {speed} | {gates} |")
    return "\n".join(lines)


def _retention_cell(r: dict) -> str:
    if r.get("retention_artifact") is None:
        return "n/a"
    return " / ".join(_fmt(r.get(k)) for k in ("retention_base", "retention_tuned", "retention_artifact"))


def adapter_rows(rep: dict, man: dict) -> list[dict]:
    """scenario_rows of a multi-adapter artifact: each adapter on the shared base, as `recipe (adapter)`."""
    from toolchain.runtime.metrics import LOWER_IS_BETTER

    out = []
    for name, r in sorted(rep["adapters"].items()):
        metric, ref, m = r["metric"], r["reference"], r["measured"]
        base, tuned = ref.get("torch_base", {}).get(metric), ref.get("torch_tuned", {}).get(metric)
        art = m.get(metric)
        out.append({"recipe": f"{name} (adapter)", "model": man["model_card"]["name"],
                    "target": f"{rep['target']} shared base", "metric": metric, "base_torch": base, "tuned_torch": tuned,
                    "tuned_better": None if base is None or tuned is None else
                    (tuned < base) if metric in LOWER_IS_BETTER else (tuned > base),
                    "onnx_fp32": ref.get("onnx_fp32", {}).get(metric), "artifact": art,
                    "artifact_over_tuned": art / tuned if isinstance(art, (int, float)) and tuned else None,
                    **_retention_row(ref, m),
                    "speed": m.get("decode_tok_s_p50"), "speed_unit": "decode tok/s p50", "status": r.get("status"),
                    "passed": r.get("passed"), "missed": [g["gate"] for g in r["gates"] if not g["passed"]]})
    return out


def auto_markdown(out: dict) -> str:
    """auto_report.md: the pick and why, every candidate, the rejected ones with the gate each missed."""
    metric = out["metric"]
    lines = ["# auto: the smallest, then fastest, variant that meets every gate", "",
             f"**Pick:** {out['reason']}." if out["pick"] else f"**No pick:** {out['reason']}.", "",
             "Gates (recipe): " + ", ".join(f"`{k}` {v}" for k, v in out["gates_spec"].items() if v is not None), "",
             f"| variant | size MB | decode tok/s | perplexity | {metric} | result |", "|---|---|---|---|---|---|"]
    missed = {r["name"]: r for r in out["rejected"]}
    for c in sorted(out["candidates"], key=lambda c: (c["size_mb"] or 0)):
        res = "**picked**" if c["name"] == out["pick"] else ("rejected: " + missed[c["name"]]["why"] if c["name"] in missed
                                                             else "meets every gate")
        lines.append(f"| {c['name']} | {_fmt(c['size_mb'], '.1f')} | {_fmt(c['decode_tok_s'], '.1f')} | "
                     f"{_fmt(c['perplexity'])} | {_fmt(c.get(metric))} | {res} |")
    if out["rejected"]:
        lines += ["", "Rejected, with the gate(s) each missed:", ""] + [
            f"- {r['name']}: " + (f"missed {r['why']}" if r["missed"] else r["why"])
            for r in out["rejected"]]
    if out.get("dropped"):
        lines += ["", "Not built (left out of the candidate list):", ""] + [f"- {k}: {v}" for k, v in out["dropped"].items()]
    return "\n".join(lines + ["", "![frontier](frontier.png)", ""])


def frontier_plot(out: dict, path: Path) -> None:
    """Size and decode tok/s against the task metric; the pick starred, rejected variants as crosses, and the
    size/accuracy Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = out["metric"]
    cs = [c for c in out["candidates"] if c["validated"] and c.get(metric) is not None]
    rejected = {r["name"] for r in out["rejected"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in [(axes[0], "size_mb", "size (MB)"), (axes[1], "decode_tok_s", "decode tok/s (p50)")]:
        for c in cs:
            style = dict(marker="*", s=220, color="#2a9d4b") if c["name"] == out["pick"] else (
                dict(marker="x", s=50, color="#c0392b") if c["name"] in rejected else dict(marker="o", s=50, color="#4a7ab5"))
            ax.scatter(c[key], c[metric], **style)
            ax.annotate(c["name"], (c[key], c[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front, best = [], -1.0
        for c in sorted(cs, key=lambda c: c[key] if key == "size_mb" else -c[key]):
            if c[metric] > best:
                front.append(c)
                best = c[metric]
        ax.plot([c[key] for c in front], [c[metric] for c in front], color="#888888", lw=1, zorder=0)
        frac, tuned = out["gates_spec"].get("min_metric_fraction"), out["reference"].get("torch_tuned", {}).get(metric)
        if frac and tuned:  # the accuracy budget as a line
            ax.axhline(frac * tuned, color="#c0392b", ls="--", lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
    fig.suptitle("auto: star = pick, x = misses a gate, grey line = frontier, dashed = metric gate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
