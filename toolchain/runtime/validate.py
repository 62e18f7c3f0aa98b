"""Validate an artifact folder with ONNX Runtime GenAI: integrity, latency, accuracy, gates. No torch.

    toolchain validate artifacts/smollm2-135m-chat-lora/cpu-int4 [--data eval.jsonl] [--json]

1. Every file against the manifest's sha256. The EP is the manifest's: where this host lacks it, the report says
   "built, not validated on this host: <EP> unavailable" (status not_validated, never passed; the CLI exits 3),
   except for a QDQ model, whose accuracy is checked on the CPU EP.
2. Latency: a warm-up, then repeated greedy runs of a fixed number of new tokens on a held-out prompt:
   TTFT p50/p95, prefill tok/s, decode tok/s p50, peak RSS, size on disk.
3. Accuracy on the held-out split shipped in the artifact (eval.jsonl, tokenized at packaging time with the same
   tokenizer): perplexity on the loss-carrying tokens, the recipe's task metric by greedy generation, and greedy
   token agreement with the reference tokens (the tuned torch model's greedy answers; the fp32 ONNX model's in
   artifacts built before 66b4efb and in multi-adapter ones).
4. The recipe's gates, against the reference numbers the pipeline recorded from the torch merged model.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

from toolchain.runtime import genai, host, manifest, metrics, retention as rt_retention, session
from toolchain.runtime.contracts import Report
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.gates import check_gates, merge_gates, status
from toolchain.runtime.manifest import EVAL_FILE
from toolchain.runtime.providers import ep_available
from toolchain.runtime.memory import peak_rss_mb

def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def latency(model, prompt_ids: list[int], new_tokens: int = 64, runs: int = 5, lookup: int = 0,
            eos: tuple[int, ...] = ()) -> dict:
    """Plain greedy timings (what the gates read); with lookup > 0 also prompt-lookup decoding's, on the same prompt."""
    def timed(**kw) -> list:
        genai.generate(model, prompt_ids, new_tokens, force_length=True, **kw)  # warm-up
        return [genai.generate(model, prompt_ids, new_tokens, force_length=True, **kw) for _ in range(runs)]

    gens = timed()
    ttft = [g.ttft_s for g in gens]
    out = {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "runs": runs,
           "ttft_ms_p50": 1000 * _percentile(ttft, 0.5), "ttft_ms_p95": 1000 * _percentile(ttft, 0.95),
           "prefill_tok_s": len(prompt_ids) / _percentile(ttft, 0.5),
           "decode_tok_s_p50": statistics.median(g.decode_tok_s for g in gens)}
    if lookup > 0:
        look = timed(lookup=lookup, eos=eos)
        out.update(lookup_decode_tok_s_p50=statistics.median(g.decode_tok_s for g in look),
                   lookup_tokens_per_step=(len(look[0].tokens) - 1) / max(look[0].steps, 1),
                   lookup_token_agreement=agreement(look[0].tokens, gens[0].tokens))
    return out


def agreement(pred: list[int], ref: list[int]) -> float:
    """Fraction of reference positions where the greedy token is the same (positions past the end count as misses)."""
    return sum(a == b for a, b in zip(pred, ref)) / len(ref) if ref else 1.0


def accuracy(model, tok, rows: list[dict], metric: str, max_new_tokens: int, progress=None,
             lookup: int = 0) -> tuple[dict, list]:
    """Perplexity over every row; for rows with a prompt, greedy generation (with prompt lookup when lookup > 0)
    scored by the metric and compared with the fp32 model's tokens where the row has them; answers_decode_tok_s is
    the decode speed over those answers, each ending where the model ends it. Returns the figures and the
    generated token lists."""
    gen_rows = [r for r in rows if "prompt_ids" in r] if metric in metrics.GENERATIVE else []
    eos = genai.eos_ids(tok)
    one_pass = not lookup and bool(gen_rows)  # each generated row scored and answered from one prefill
    nll, n, done = 0.0, 0, {}  # done: id(row) -> its Generation from genai.nll_then_generate
    for r in rows:
        k = len(r.get("prompt_ids", ()))
        res = None
        if one_pass and k and r["input_ids"][:k] == r["prompt_ids"]:
            res = genai.nll_then_generate(model, r["input_ids"], r["labels"], k, max_new_tokens, eos)
            one_pass = res is not None  # None: a pruned lm_head, no row logits; score and answer apart
        if res is None:
            res = genai.nll(model, r["input_ids"], r["labels"])
        else:
            done[id(r)] = res[2]
            if progress:  # answered here, as it happens
                progress(len(done), len(gen_rows))
        nll, n = nll + res[0], n + res[1]
    out = {"perplexity": metrics.perplexity(nll, n), "eval_tokens": n}
    generated = []
    if gen_rows:
        agree, decoded, decode_s = [], 0, 0.0
        answered = len(done)
        for r in gen_rows:
            g = done.get(id(r))
            if g is None:
                g = genai.generate(model, r["prompt_ids"], max_new_tokens, lookup=lookup, eos=eos)
                answered += 1
                if progress:
                    progress(answered, len(gen_rows))
            generated.append(g.tokens)
            decoded, decode_s = decoded + len(g.tokens) - 1, decode_s + g.decode_s
            if "fp32_tokens" in r:
                agree.append(agreement(generated[-1], r["fp32_tokens"]))
        preds = [genai.decode(tok, t) for t in generated]
        out.update(metrics.task_scores(metric, preds, [r["reference"] for r in gen_rows],
                                       [r.get("constraints", {}) for r in gen_rows]))
        out["eval_examples"] = len(gen_rows)
        out["answers_decode_tok_s"] = decoded / decode_s if decode_s else float("nan")
        if agree:
            out["token_agreement_fp32"] = sum(agree) / len(agree)
    return out, generated


def retention(model, tok, rows: list[dict]) -> dict:
    """The retention figures (runtime/retention.py) of greedy answers to the shipped general set (retention.jsonl:
    each item with its prompt tokenized under the generic system prompt)."""
    eos = genai.eos_ids(tok)
    replies = []
    for r in rows:
        toks = genai.generate(model, r["prompt_ids"], rt_retention.MAX_NEW_TOKENS).tokens
        replies.append(genai.decode(tok, [t for t in toks if t not in eos]))
    return rt_retention.score(rows, replies)


def eval_rows(folder: Path, data: Optional[Path], tok) -> list[dict]:
    """The rows to score: the shipped eval.jsonl (tokenized at packaging), or the user's file tokenized here."""
    from toolchain.runtime.devicedata import tokenize_rows

    if data is None:
        return [json.loads(x) for x in (folder / EVAL_FILE).read_text().splitlines() if x.strip()]
    return tokenize_rows(Path(data), tok)


def pick_provider(target: dict) -> tuple[Optional[str], Optional[str]]:
    """(onnxruntime-genai provider to validate on, note). The manifest names the EP; a missing EP is never
    validated on another, except a QDQ model (standard ONNX), whose accuracy is checked on the CPU EP.
    (None, reason) when this host cannot validate the artifact."""
    provider = target.get("provider", "cpu")
    ep = target.get("ep") or ("CPUExecutionProvider" if provider == "cpu" else provider)
    if provider == "cpu" or ep_available(ep, provider):
        return provider, None
    if target.get("cpu_reference"):
        return "cpu", f"accuracy checked on the CPU EP: {ep} unavailable on this host (speed is the CPU's, not the NPU's)"
    return None, f"built, not validated on this host: {ep} unavailable"


def _size_mb(folder: Path, man: dict) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name in man["files"] and p.suffix in (".onnx", ".data")) / 1e6


def validate(folder: Path, data: Optional[Path] = None, progress=None, lookup: int = 0,
             threads: Optional[int] = None, stage=None) -> dict:
    """The report. status: "passed", "gates_missed", "not_validated" (EP missing here: never a pass), or with
    `data` (the user's file, scored against no gates) "scored", with `passed` left out.
    lookup > 0: the task's answers are generated with prompt-lookup decoding (drafts of up to `lookup` tokens), and
    the latency block adds its speed beside plain greedy's, which the gates keep reading. threads: intra-op threads
    for this run (default: runtime/session.resolve's); the report's `session` says what ran and why, `host` the
    thread count. progress(i, n): after each generated answer; stage(what): as each stage starts."""
    folder = Path(folder)
    say = stage or (lambda what: None)
    say("checking every file against the manifest's sha256")
    man = manifest.verify(folder)
    if man.get("adapters"):
        raise ToolchainError(f"{folder}: a multi-adapter artifact; validate it with toolchain.runtime.adapters.validate "
                             "(`toolchain validate` does)")
    if man.get("model_card", {}).get("kind") == "encoder":  # ONNX + tokenizers, no GenAI folder
        from toolchain.runtime.encoder import validate as validate_encoder

        return validate_encoder(folder, man, data, progress)
    if man["target"].get("built_by") == "llama.cpp":  # a GGUF: llama.cpp, not ONNX Runtime
        from toolchain.runtime.llamacpp import validate as validate_gguf

        return validate_gguf(folder, man, data, progress, lookup)
    target = man["target"]
    settings = session.resolve(folder, threads)
    base = {"artifact": str(folder), "target": target["name"], "ep": target.get("ep", "CPUExecutionProvider"),
            "precision": target.get("precision"), "reference": man.get("reference", {}),
            "host": host.describe(session.threads(settings)), "session": settings,
            "build_stages": [{"stage": x["stage"], **x["cost"]} for x in man.get("lineage", []) if x.get("cost")] or None}
    provider, note = pick_provider(target)
    if provider is None:
        return Report(**base, metric=man["recipe"]["metric"]["name"], validated=False, status="not_validated",
                      reason=note, measured={"size_mb": _size_mb(folder, man)}, passed=False).out()
    say(f"loading on {provider}: {session.one_line(settings)}")
    model, tok = genai.load(folder, provider, target.get("provider_options") if provider != "cpu" else None, settings)
    rows = eval_rows(folder, data, tok)
    rec = man["recipe"]
    t0 = time.time()
    say("latency: a warm-up, then 5 greedy runs of 64 new tokens" + (f", also with lookup {lookup}" if lookup else ""))
    lat = latency(model, rows[0].get("prompt_ids") or rows[0]["input_ids"], lookup=lookup,
                  eos=genai.eos_ids(tok))
    say(f"accuracy: perplexity over {len(rows)} rows, then {rec['metric']['name']} by greedy generation")
    acc, _ = accuracy(model, tok, rows, rec["metric"]["name"], rec["metric"]["max_new_tokens"], progress, lookup)
    general = rt_retention.read(folder) if data is None else []
    if general:
        say(f"retention: {len(general)} general questions under a generic system prompt")
        acc.update(retention(model, tok, general))
    measured = {**lat, **acc, "size_mb": _size_mb(folder, man),
                "peak_rss_mb": peak_rss_mb()}
    gate_spec = merge_gates(rec.get("gates", {}), target.get("gates", {}))
    not_applicable = []
    if note and gate_spec.get("min_decode_tok_s") is not None:  # the CPU's speed says nothing about the NPU's
        not_applicable.append("min_decode_tok_s")
        gate_spec.pop("min_decode_tok_s")
    gates = check_gates(gate_spec, measured, base["reference"], rec["metric"]["name"]) if data is None else []
    passed = all(g["passed"] for g in gates) if data is None else None
    return Report(**base, provider=provider, metric=rec["metric"]["name"], validated=True,
                  status=status(passed), data=str(data) if data else EVAL_FILE,
                  measured=measured, gates=gates, passed=passed, seconds=round(time.time() - t0, 1),
                  decoding=f"greedy with prompt lookup (drafts of up to {lookup} tokens)" if lookup > 0 else None,
                  target_gates=target.get("gates") or None, note=note,
                  gates_not_applicable=not_applicable if note else None).out()
