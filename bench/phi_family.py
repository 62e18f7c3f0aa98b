"""Export parity of every Phi card's shape: a tiny random model of each card's real config kinds (tests/conftest.py
TINY_PHI, from toolchain/config/shapes.py) through the whole chain to cpu-int4, as `toolchain edge --model CARD
--model-path TINY --recipe <chat-lora, 4 steps> --target cpu-int4` runs it. Writes
bench/results/phi-family-parity.{json,md}: per card the exporter that ran, max |logit diff| and top-1 agreement
of the fp32 export against torch, and whether the artifact validated.

    python bench/phi_family.py [--cards phi-3-mini,phi-4-mini] [--work /tmp/phi-family]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def run_card(card: str, work: Path) -> dict:
    from conftest import TINY_PHI, make_tiny_phi, tiny_recipe_file
    from toolchain import pipeline
    from toolchain.runtime.errors import ToolchainError

    folder = work / card
    folder.mkdir(parents=True, exist_ok=True)
    model = make_tiny_phi(card, folder / "model")
    cfg = json.loads((model / "config.json").read_text())
    row = {"card": card, "tiny": {**TINY_PHI[card], "num_hidden_layers": 2,
                                  "partial_rotary_factor": cfg.get("partial_rotary_factor", 1.0),
                                  "rope_scaling": (cfg.get("rope_scaling") or {}).get("type"),
                                  "tie_word_embeddings": cfg["tie_word_embeddings"]}}
    rec = tiny_recipe_file(folder, gates={})
    try:
        rep = pipeline.edge(card, str(rec), target="cpu-int4", out=folder / "artifacts", model_path=str(model))
    except ToolchainError as e:
        return {**row, "error": str(e)}
    ex = json.loads((folder / f"artifacts/{card}-chat-lora/stages/export-genai/export_report.json").read_text())
    return {**row, "exporter": ex["exporter"], "fallback_reason": ex.get("fallback_reason"),
            "max_abs_logit_diff": ex["parity"]["max_abs_logit_diff"], "top1_agreement": ex["parity"]["top1_agreement"],
            "positions": ex["parity"]["positions"], "artifact_status": rep["status"],
            "artifact_size_mb": rep["headline"]["size_mb"]}


def markdown(res: dict) -> str:
    host = res["host"]
    lines = ["# Phi family: export parity per card shape (tiny random models, cpu-int4 chain)", "",
             f"commit `{res['commit']}`; host: {host.get('cpu')} ({', '.join(host.get('isa', []))}), "
             f"{host.get('cores')} cores; command: `{res['command']}`", "",
             "| card | tiny shape | exporter | max \\|logit diff\\| | top-1 | cpu-int4 artifact |", "|---|---|---|---|---|---|"]
    for r in res["cards"]:
        t = r["tiny"]
        shape = (f"h{t['hidden_size']} i{t['intermediate_size']} heads {t['num_attention_heads']}/"
                 f"{t['num_key_value_heads']} vocab {t['vocab_size']}"
                 + (f", {t['rope_scaling']}" if t["rope_scaling"] else "")
                 + (f", rotary {t['partial_rotary_factor']}" if t["partial_rotary_factor"] != 1.0 else "")
                 + (", tied" if t["tie_word_embeddings"] else ""))
        if "error" in r:
            lines.append(f"| {r['card']} | {shape} | | | | failed: {r['error']} |")
        else:
            lines.append(f"| {r['card']} | {shape} | {r['exporter']} | {r['max_abs_logit_diff']:.1e} | "
                         f"{r['top1_agreement']:.3f} ({r['positions']} positions) | {r['artifact_status']}, "
                         f"{r['artifact_size_mb']:.2f} MB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from provenance import fields

    from toolchain.config.shapes import PHI

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", default=",".join(sorted(PHI)))
    ap.add_argument("--work", type=Path, default=None, help="where the tiny models and artifacts go (a temp dir)")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="phi-family-"))
    res = {**fields(), "cards": [run_card(c, work) for c in a.cards.split(",")]}
    (a.out / "phi-family-parity.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "phi-family-parity.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
