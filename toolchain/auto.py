"""`--target auto`: build the variants this host can run, validate each, pick the smallest (then fastest) that
meets every gate of the recipe.

Candidates: weight-only int4 variants of cpu-int4 (block size, symmetric/asymmetric, RTN/k-quant, lm_head
int4/int8, mixed int4/int8 projections), weight-only int8, and the builder targets whose EP this host has
(CUDA/DML/WebGPU; none on a CPU host).
Each is a full artifact under <run>/auto/<variant>/ with its own manifest and report; a candidate whose artifact
is unchanged keeps its report (delete it, or --force, to re-measure). The choice, the rejected variants with the
gate each missed, and the frontier plot go to <run>/auto/auto_report.{json,md} and frontier.png.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from toolchain.config.targets import TARGETS
from toolchain.runtime.contracts import Report
from toolchain.runtime.providers import ep_available

# (variant, base target, changes to the recipe's quantize: section)
CANDIDATES = [
    ("int4-rtn-b32-asym", "cpu-int4", {"algo": "rtn", "block_size": 32, "symmetric": False}),
    ("int4-rtn-b32-sym", "cpu-int4", {"algo": "rtn", "block_size": 32, "symmetric": True}),
    ("int4-rtn-b128-asym", "cpu-int4", {"algo": "rtn", "block_size": 128, "symmetric": False}),
    ("int4-rtn-b128-sym", "cpu-int4", {"algo": "rtn", "block_size": 128, "symmetric": True}),
    ("int4-rtn-b32-asym-head8", "cpu-int4", {"algo": "rtn", "block_size": 32, "symmetric": False, "lm_head_bits": 8}),
    ("int4-kquant-b32", "cpu-int4", {"algo": "k_quant", "block_size": 32, "symmetric": False}),
    # mixed: only gate/up of the middle layers in int4; qkv, o, down, the 3 first and 3 last layers and lm_head in
    # 8-bit (llama.cpp Q4_K_M's fidelity on SmolLM2, bench/decode.py MIXED)
    ("int4-mixed-int8", "cpu-int4", {"algo": "rtn", "block_size": 32, "symmetric": False, "lm_head_bits": 8,
                                     "int8": ["qkv_proj", "o_proj", "down_proj"], "int8_edge_layers": 3}),
    ("int8", "cpu-int8", None),
]
# Left out of the default list, with why (auto_report.md repeats it). `quantize: {algo: hqq}` in a recipe still builds it.
DROPPED = {
    "int4-hqq-b32": "ORT's HQQ quantizer writes MatMulNBits with float zero points (RTN: packed uint8), which keep "
                    "the CPU EP off its fast int4 kernel: 1.4-2.3 decode tok/s on SmolLM2 against 79 for RTN, "
                    "unchanged with accuracy_level 4 set by hand, and 1182 s to validate one artifact; it also scored "
                    "0.109 exact match on chat-lora (RTN 0.922)",
}
SIZE_TIE = 0.01  # sizes within 1% of the smallest count as equal; the faster one wins


def candidates() -> list[tuple[str, str, Optional[dict]]]:
    """The CPU variants, plus every builder target whose EP this host can run."""
    extra = [(n, n, None) for n, t in TARGETS.items() if t["built_by"] == "builder" and ep_available(t["ep"], t["provider"])]
    return CANDIDATES + extra


def summarize(name: str, rep: dict, metric: str) -> dict:
    m = rep.get("measured", {})
    return {"name": name, "artifact": rep.get("artifact"), "validated": bool(rep.get("validated")),
            "status": rep.get("status"), "reason": rep.get("reason"), "size_mb": m.get("size_mb"),
            "decode_tok_s": m.get("decode_tok_s_p50"), "perplexity": m.get("perplexity"), metric: m.get(metric),
            "gates": rep.get("gates", [])}


def choose(cands: list[dict]) -> dict:
    """Pure gate logic. A candidate qualifies only if it was validated and passed every gate (a missing EP is never a
    pass). Among those: the smallest, sizes within SIZE_TIE counting as equal, then the fastest decode."""
    rejected, ok = [], []
    for c in cands:
        if not c["validated"]:
            rejected.append({"name": c["name"], "missed": [], "why": c.get("reason") or "not validated"})
            continue
        missed = [g for g in c["gates"] if not g["passed"]]
        if missed:
            rejected.append({"name": c["name"], "missed": [g["gate"] for g in missed],
                             "why": "; ".join(f"{g['gate']} {g['value']:.3f} vs limit {g['limit']}" for g in missed)})
        else:
            ok.append(c)
    if not ok:
        return {"pick": None, "reason": "no variant meets every gate of the recipe", "rejected": rejected, "qualified": []}
    smallest = min(c["size_mb"] for c in ok)
    ties = [c for c in ok if c["size_mb"] <= smallest * (1 + SIZE_TIE)]
    pick = max(ties, key=lambda c: c["decode_tok_s"] or 0.0)
    gates = ", ".join(sorted({g["gate"] for g in pick["gates"]})) or "none set by the recipe"
    reason = (f"{pick['name']}: the smallest of the {len(ok)} variant(s) meeting every gate ({gates}) at "
              f"{pick['size_mb']:.1f} MB")
    if len(ties) > 1:
        others = ", ".join(f"{c['name']} {c['decode_tok_s']:.1f}" for c in ties if c is not pick)
        reason += (f"; fastest ({pick['decode_tok_s']:.1f} decode tok/s) of those within {SIZE_TIE:.0%} of that size "
                   f"({others})")
    if pick["gates"]:
        reason += "; its figures: " + ", ".join(f"{g['gate']} {g['value']:.3f} (limit {g['limit']})" for g in pick["gates"])
    larger = sorted((c for c in ok if c not in ties), key=lambda c: c["size_mb"])
    if larger:
        reason += f"; the next passing variant, {larger[0]['name']}, is {larger[0]['size_mb']:.1f} MB"
    return {"pick": pick["name"], "reason": reason, "rejected": rejected,
            "qualified": [c["name"] for c in sorted(ok, key=lambda c: (c["size_mb"], -(c["decode_tok_s"] or 0)))]}


def cached_report(art: Path) -> Optional[dict]:
    """The report validate wrote after the artifact was last (re)packaged, if it scored the shipped eval split."""
    f = art / "report.json"
    if not f.is_file():
        return None
    rep = json.loads(f.read_text())
    return rep if rep.get("data") == "eval.jsonl" and rep.get("validated") else None


def result(cands: list[dict], recipe, reference: dict, folder: Path) -> dict:
    """auto's report: the choice among the validated candidates, with every candidate and the dropped variants."""
    choice = choose(cands)
    return Report(target="auto", validated=True, status="passed" if choice["pick"] else "gates_missed",
                  passed=choice["pick"] is not None, metric=recipe.metric.name, gates_spec=recipe.gates.model_dump(),
                  reference=reference, **choice, candidates=cands, dropped=DROPPED,
                  artifact=str(folder / choice["pick"]) if choice["pick"] else None).out(keep=("pick", "artifact"))
