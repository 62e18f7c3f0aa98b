"""An artifact's gates: the recipe's, tightened by its target's own budget, checked against what was measured.
No torch; the decoder and encoder validators both call check_gates."""
from __future__ import annotations

from toolchain.runtime import metrics


def check_gates(gates: dict, measured: dict, reference: dict, metric: str) -> list[dict]:
    """One entry per gate: name, limit, value, passed."""
    gates = {k: v for k, v in gates.items() if v is not None}  # unset gates
    ref = reference.get("torch_tuned", {})
    values = {}  # gate -> measured value, in report order; min_* gates pass at or above the limit, max_* at or below
    if "max_perplexity_increase_pct" in gates and "perplexity" in ref:
        values["max_perplexity_increase_pct"] = 100 * (measured["perplexity"] / ref["perplexity"] - 1)
    if metric in ref and metric in measured and metric not in metrics.LOWER_IS_BETTER:
        values["min_metric_fraction"] = measured[metric] / ref[metric] if ref[metric] else float("inf")
    base = reference.get("torch_base", {}).get("retention")
    if "retention" in measured and base is not None:  # what the artifact still knows, as a share of the base's
        values["min_retention"] = measured["retention"] / base if base else float("inf")
    for gate, key in (("max_latency_ms_p95", "latency_ms_p95"), ("min_token_agreement_fp32", "token_agreement_fp32"),
                      ("min_decode_tok_s", "decode_tok_s_p50")):
        if key in measured:
            values[gate] = measured[key]
    return [{"gate": g, "limit": gates[g], "value": v,
             "passed": v >= gates[g] if g.startswith("min_") else v <= gates[g]}
            for g, v in values.items() if g in gates]


def merge_gates(recipe_gates: dict, target_gates: dict) -> dict:
    """The recipe's gates, then the target's own budget (targets.py, carried in the manifest), which adds a gate or
    tightens one: a target's gate never loosens the recipe's."""
    out = {k: v for k, v in recipe_gates.items() if v is not None}
    for k, v in target_gates.items():
        stricter = max if k.startswith("min_") else min
        out[k] = stricter(v, out[k]) if k in out else v
    return out


def status(passed) -> str:
    """A validated report's status from its gates' verdict: None (the user's --data, no gates) is "scored"."""
    return "scored" if passed is None else "passed" if passed else "gates_missed"
