"""Prompt-lookup decoding, ours against llama.cpp with the same drafting code, on the models bench/decode.py builds.

    .venv/bin/python bench/lookup.py [--merged DIR] [--threads 1,2] [--k 3,8] [--reps 3]

Both runtimes run toolchain/runtime/lookup.py's loop (same drafts, same acceptance rule, same draft-length schedule);
only the checking forward pass differs: onnxruntime-genai append_tokens + rewind_to for our cpu-int4 artifact,
Llama.eval with logits_all + a KV-cache truncation for llama.cpp Q4_0. "plain" is each runtime's one-token loop
(ours: onnxruntime-genai's own generate_next_token loop; llama.cpp: the same loop as bench/decode.py).

Two workloads, so that the gain is not read off the friendliest one alone:
  text   the 32- and 512-token held-out text prompts of bench/decode.py, 128 new tokens forced (end-of-sequence
         masked, as onnxruntime-genai's min_length does): a 135M model soon repeats itself here, which drafts match;
  chat   chat-lora's held-out conversations (eval split), each answer ending where the model ends it (at most the
         recipe's max_new_tokens): short answers that copy names and cities from the prompt.
Every (runtime, threads) runs in its own process; each figure is decoded tokens over decode seconds, summed over the
workload's prompts and `--reps` timed passes (after one warm-up pass). Results: bench/results/lookup-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode as D  # noqa: E402

sys.path.insert(0, str(D.REPO))


def _workloads(merged: Path, recipe: str) -> dict:
    from transformers import AutoTokenizer

    from toolchain.config.catalog import load_recipe

    stream = D.inputs(merged, recipe)["prompt_stream"]
    tok = AutoTokenizer.from_pretrained(str(merged))
    rec, rec_file = load_recipe(recipe)
    rows = [json.loads(x) for x in (rec_file.parent / rec.data.eval).read_text().splitlines() if x.strip()]
    chats = [list(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True)) for r in rows]
    return {"text": {"prompts": [stream[:32], stream[:512]], "new": D.NEW_TOKENS, "force": True},
            "chat": {"prompts": chats, "new": rec.metric.max_new_tokens, "force": False},
            "eos": [int(tok.eos_token_id)]}


def worker(job: dict) -> dict:
    from toolchain.runtime import genai
    from toolchain.runtime.lookup import decode, greedy

    k, eos = job["k"], tuple(job["eos"])
    if job["kind"] == "genai":
        model = D._genai_model(job["path"], job["threads"])

        def run(ids, new, force):
            g = genai.generate(model, ids, new, force_length=force, lookup=k, eos=eos)
            return g.tokens, g.decode_s, g.steps
    else:
        llm = D._Llama(job["path"], job["threads"], 1024, logits_all=True).llm  # every checked position's logits

        def run(ids, new, force):
            masked, stop = (eos, ()) if force else ((), eos)

            def forward(tokens):
                n0 = llm.n_tokens
                llm.eval(tokens)
                return greedy(llm.scores[n0:n0 + len(tokens)], masked)

            def rewind(n):
                llm.n_tokens -= n  # Llama.eval drops the KV cache past n_tokens before its next batch

            llm.reset()
            first = int(forward(ids)[-1])
            t = time.perf_counter()
            out, steps = decode(ids, first, forward, rewind, new, k, stop)
            return out, time.perf_counter() - t, steps
    res = {}
    for name, w in job["workloads"].items():
        for ids in w["prompts"][:2]:
            run(ids, w["new"], w["force"])  # warm-up
        tokens = steps = 0
        secs = 0.0
        outs = []
        for _ in range(job["reps"]):
            for ids in w["prompts"]:
                out, s, n = run(ids, w["new"], w["force"])
                tokens, secs, steps = tokens + len(out) - 1, secs + s, steps + n
                outs.append(out)
        res[name] = {"decode_tok_s": tokens / secs, "tokens_per_step": tokens / max(steps, 1), "tokens": tokens,
                     "outputs": outs[:len(w["prompts"])]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--merged", help="merged fp32 HF folder (default: the recipe's pipeline stage)")
    ap.add_argument("--recipe", default="chat-lora")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--k", default="3,8", help="longest drafts to try, comma-separated (0, plain, always runs)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(D.REPO / "bench" / "results"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return
    merged = D.merged_model(args)
    ours = D.ours(merged, args.recipe)["ours cpu-int4"]["path"]
    llama = D.llama_models(merged)["llama.cpp Q4_0"]["path"]
    w = _workloads(merged, args.recipe)
    ks = [0, *[int(x) for x in args.k.split(",") if int(x) > 0]]
    import provenance

    res = {"date": datetime.date.today().isoformat(), "loadavg_start": D.loadavg(), "merged": str(merged),
           **provenance.fields(), "versions": D.versions(), "rows": []}
    for t in [int(x) for x in args.threads.split(",")]:
        for name, kind, path in (("ours cpu-int4", "genai", ours), ("llama.cpp Q4_0", "llama", llama)):
            for k in ks:
                job = {"kind": kind, "path": path, "threads": t, "k": k, "reps": args.reps, "eos": w["eos"],
                       "workloads": {n: w[n] for n in ("text", "chat")}}
                env = {**os.environ, "OMP_NUM_THREADS": str(t)}
                r = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(job), text=True,
                                   capture_output=True, env=env)
                if r.returncode != 0:
                    raise SystemExit(f"{name} k={k} t={t}: {r.stderr[-2000:]}")
                row = {"runtime": name, "threads": t, "k": k, **json.loads(r.stdout.strip().splitlines()[-1]),
                       "loadavg": D.loadavg()}
                res["rows"].append(row)
                print(f"{name} t={t} k={k}: " + ", ".join(f"{n} {row[n]['decode_tok_s']:.1f} tok/s "
                                                          f"({row[n]['tokens_per_step']:.2f}/step)"
                                                          for n in ("text", "chat")), file=sys.stderr, flush=True)
    res["loadavg_end"] = D.loadavg()
    for row in res["rows"]:  # the same tokens as that runtime's plain loop?
        plain = next(r for r in res["rows"] if r["runtime"] == row["runtime"] and r["threads"] == row["threads"]
                     and r["k"] == 0)
        for n in ("text", "chat"):
            row[n]["same_as_plain"] = sum(a == b for a, b in zip(row[n]["outputs"], plain[n]["outputs"]))
            row[n]["prompts"] = len(plain[n]["outputs"])
    md = table(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"lookup-{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(md + "\n")
    print(md)


def table(res: dict) -> str:
    base = {r["threads"]: r for r in res["rows"] if r["runtime"] == "llama.cpp Q4_0" and r["k"] == 0}
    lines = ["| runtime | threads | decoding | text tok/s | vs llama.cpp plain | tokens/step | chat tok/s | vs llama.cpp "
             "plain | tokens/step | same tokens as plain (text, chat) |", "|" + "---|" * 10]
    for r in res["rows"]:
        b = base[r["threads"]]
        how = "plain" if r["k"] == 0 else f"lookup k={r['k']}"
        lines.append(f"| {r['runtime']} | {r['threads']} | {how} | {r['text']['decode_tok_s']:.1f} | "
                     f"{r['text']['decode_tok_s'] / b['text']['decode_tok_s']:.2f}x | {r['text']['tokens_per_step']:.2f} | "
                     f"{r['chat']['decode_tok_s']:.1f} | {r['chat']['decode_tok_s'] / b['chat']['decode_tok_s']:.2f}x | "
                     f"{r['chat']['tokens_per_step']:.2f} | {r['text']['same_as_plain']}/{r['text']['prompts']}, "
                     f"{r['chat']['same_as_plain']}/{r['chat']['prompts']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
