"""Where the decode time of an onnxruntime-genai artifact goes: ONNX Runtime's own profiler (session option
enable_profiling) over one greedy generation, the prefill run left out.

    .venv/bin/python bench/profile_decode.py ARTIFACT [--threads 2] [--prompt 32] [--new-tokens 128]

Prints, per decode step: wall time per token, the part inside ONNX Runtime's model_run, and the rest (the
onnxruntime-genai loop: inputs, KV bookkeeping, logits copy, greedy search); then the op types by share of the
kernel time. Writes bench/results/profile-<name>-<date>.json.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    import numpy as np
    import onnxruntime_genai as og

    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ortprof-"))
    prefix = str(work / "ort")
    cfg = og.Config(args.artifact)
    cfg.clear_providers()
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1, "enable_profiling": prefix}}}}))
    model = og.Model(cfg)
    ids = list(range(1000, 1000 + args.prompt))
    load0 = [round(x, 2) for x in os.getloadavg()]
    params = og.GeneratorParams(model)
    total = args.prompt + args.new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    gen.generate_next_token()
    t0 = time.perf_counter()
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    wall = time.perf_counter() - t0
    del gen, params, model  # the profile file is written when the session ends
    files = sorted(work.glob("ort*.json"))
    if not files:
        raise SystemExit("ONNX Runtime wrote no profile")
    events = json.loads(files[-1].read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first run is the prefill
    t_first = decode_runs[0]["ts"] if decode_runs else 0
    nodes = [e for e in events if e.get("cat") == "Node" and e["ts"] >= t_first and e["name"].endswith("_kernel_time")]
    by_op = collections.Counter()
    count = collections.Counter()
    for e in nodes:
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"]
        count[op] += 1
    kernel = sum(by_op.values())
    run_us = sum(e["dur"] for e in decode_runs)
    n = max(len(decode_runs), 1)
    from provenance import fields

    res = {**fields(args.threads), "artifact": args.artifact, "threads": args.threads, "prompt": args.prompt,
           "decode_steps": steps, "loadavg": load0, "wall_ms_per_token": 1000 * wall / max(steps, 1),
           "model_run_ms_per_token": run_us / 1000 / n, "kernel_ms_per_token": kernel / 1000 / n,
           "note": "profiling itself adds overhead: compare shares, not absolute speed",
           "ops": [{"op": op, "ms_per_token": us / 1000 / n, "share_of_kernel": us / kernel, "calls_per_token": count[op] / n}
                   for op, us in by_op.most_common()]}
    res["outside_model_run_ms_per_token"] = res["wall_ms_per_token"] - res["model_run_ms_per_token"]
    name = args.name or Path(args.artifact).name
    out = REPO / "bench" / "results" / f"profile-{name}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"{name}, {args.threads} thread(s), load {load0}: {res['wall_ms_per_token']:.2f} ms/token wall, "
          f"{res['model_run_ms_per_token']:.2f} in model_run ({res['kernel_ms_per_token']:.2f} in kernels), "
          f"{res['outside_model_run_ms_per_token']:.2f} outside")
    print("| op | ms/token | share of kernel time | calls/token |\n|---|---|---|---|")
    for o in res["ops"][:12]:
        print(f"| {o['op']} | {o['ms_per_token']:.3f} | {100 * o['share_of_kernel']:.1f}% | {o['calls_per_token']:.0f} |")
    print(f"written {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
