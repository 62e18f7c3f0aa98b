"""CPU decode race: our ONNX Runtime GenAI artifacts against llama.cpp (llama-cpp-python) and PyTorch fp32, on the
same merged fine-tuned model, the same token ids, the same thread counts.

    make bench                                   # builds the llama-cpp-python wheel once, then runs this
    .venv/bin/python bench/decode.py [--merged DIR] [--threads 1,2] [--prompts 32,512] [--rounds 2]
    .venv/bin/python bench/decode.py --tune      # the cpu-int4 tuning matrix (our variants only, 2 threads)

What it does:
  1. The merged fp32 HF model: `--merged DIR`, or the chat-lora pipeline's merged stage (`toolchain edge` stages,
     reused when cached).
  2. Our artifacts, built from it with the toolchain's own stages: the fp32 export (onnxruntime-genai builder), then
     cpu-fp32, cpu-int8 and cpu-int4 (the recipe's `quantize:` settings), the mixed int4/int8 (MIXED) and all-int4
     (ALL_INT4) variants unless the recipe ships one, cpu-int4 with its lm_head pruned to the last position (speed
     only), plus the builder's own int4 defaults.
  3. llama.cpp: the merged model converted to an f32 GGUF by llama.cpp's own converter (convert_hf_to_gguf.py from
     the llama-cpp-python source distribution), then Q4_0 and Q4_K_M by llama.cpp's quantizer
     (llama_cpp.llama_model_quantize): toolchain/stages/quantize/gguf.py, what the gguf-* targets are built by.
  4. Speed: every (runtime, threads) in its own process (its own peak RSS), greedy, 128 new tokens, prompts of 32 and
     512 tokens cut from held-out text, one warm-up, then `--reps` timed runs; the whole list of configurations is
     run `--rounds` times, interleaved, and the median over all timed runs is reported. Figures: prefill tok/s,
     decode tok/s, TTFT, peak RSS, model size on disk.
  5. Quality against the fp32 merged model (PyTorch): on held-out text (domain-adapt eval chunks) and held-out
     conversations (chat-lora eval), every quantized model scores the same token ids in one pass; Δperplexity with
     its 95% interval, top-1 agreement and mean KL(fp32 || quantized) over all positions.
Results: bench/results/decode-<date>.json, a markdown table on stdout (also written next to the JSON) and a PNG plot.
os.getloadavg() is recorded with every measurement: the machine may be shared; compare ratios within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toolchain.runtime.memory import peak_rss_mb  # noqa: E402

WORK = REPO / ".cache" / "bench"
NEW_TOKENS = 128
LLAMA_QUANTS = ("Q4_0", "Q4_K_M")  # by llama.cpp's quantizer (stages/quantize/gguf.py FTYPES)
QUALITY_TEXT_CHUNKS = 48  # all of domain-adapt/eval.jsonl: about 7k scored positions
QUALITY_CHATS = 24


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def dir_size_mb(path: Path, pattern: str = "*") -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.glob(pattern) if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 1e6, 1)


# ----------------------------------------------------------------------------------------------- models to compare


def merged_model(args) -> Path:
    if args.merged:
        return Path(args.merged)
    from toolchain.config.catalog import load_recipe
    from toolchain.config.sources import resolve
    from toolchain.pipeline import prepare

    rec, rec_file = load_recipe(args.recipe)
    return prepare(resolve(rec.model), rec, rec_file, Path(args.artifacts)).merged


def ours(merged: Path, recipe: str) -> dict[str, dict]:
    """Our cpu targets from the merged folder, with the toolchain's export/quantize/build functions, cached by the
    merged weights' stamp."""
    from toolchain.config.catalog import load_recipe
    from toolchain.stages.export.decoder import export
    from toolchain.runtime.fsutil import sha256_file
    from toolchain.config import targets
    from toolchain.stages.quantize.nbits import quantize, spec_for
    from toolchain.config.schema import QuantizeSpec
    from toolchain.stages.package import stamp_genai_config

    stamp = sha256_file(merged / "model.safetensors")[:12]
    root = WORK / f"ours-{stamp}"
    fp32 = root / "export-fp32"
    if not (fp32 / "model.onnx").is_file():
        export(merged, fp32, exporter="genai")
    spec = load_recipe(recipe)[0].quantize
    mixed = QuantizeSpec(**{**spec.model_dump(), **MIXED})
    all_int4 = QuantizeSpec(**{**spec.model_dump(), **ALL_INT4})
    pruned = QuantizeSpec(**{**spec.model_dump(), "prune_lm_head": True})
    out = {}
    variants = [("ours cpu-fp32", "cpu-fp32", "cpu-fp32", None),
                ("ours cpu-int8", "cpu-int8", "cpu-int8", spec_for("cpu-int8", None)),
                ("ours cpu-int4", "cpu-int4", "cpu-int4", spec),
                (MIXED_NAME, "cpu-int4-mixed", "cpu-int4", mixed),
                (ALL_INT4_NAME, "cpu-int4-all-int4", "cpu-int4", all_int4),
                (PRUNED_NAME, "cpu-int4-pruned", "cpu-int4", pruned)]
    for name, folder, target, sp in unshipped(variants, spec, (mixed, all_int4)):
        d = root / folder
        key = json.dumps(sp.model_dump(), sort_keys=True) if sp else ""
        stamp_file = d / ".bench-spec"
        if not (d / "model.onnx").is_file() or not stamp_file.is_file() or stamp_file.read_text() != key:
            if d.exists():
                shutil.rmtree(d)
            quantize(fp32, target, d, sp)
            stamp_file.write_text(key)
        stamp_genai_config(d, targets.get(target))  # the session defaults an artifact ships with
        # the pruned model's weights are cpu-int4's, and it has no logits to score but the last position's
        out[name] = {"kind": "genai", "path": str(d), "no_quality": sp is pruned}
    out["ort-genai builder int4 (defaults)"] = {"kind": "genai", "path": str(builder_int4(merged, root / "builder-int4"))}
    return out


def unshipped(variants: list[tuple], spec, extras: tuple) -> list[tuple]:
    """`variants` without the extra variants (by identity) whose settings equal the recipe's `spec`: a variant the
    recipe ships already (chat-dora ships MIXED) is its "ours cpu-int4" row, not built and timed twice."""
    return [v for v in variants if not (any(v[3] is x for x in extras) and v[3] == spec)]


# Mixed int4/int8 at llama.cpp Q4_K_M's fidelity: the projections and layers whose 8-bit width cut the mean KL to fp32
# the most per byte on SmolLM2 (16 text chunks, from int4 with an int8 lm_head at 0.30: qkv -> 0.19, down -> 0.18,
# the 3 first and 3 last layers -> 0.21, o -> 0.28; lm_head int4 -> int8: 0.37 -> 0.30). Only gate/up of the middle
# 24 layers stay int4. On all 48 chunks: KL 0.052 (without o_proj 0.062) against Q4_K_M's 0.059.
MIXED = {"int8": ["qkv_proj", "o_proj", "down_proj"], "int8_edge_layers": 3, "lm_head_bits": 8}
MIXED_NAME = "ours cpu-int4 mixed (gate/up int4, rest int8)"
# Every projection and the lm_head in int4 (chat-lora ships every projection in int8): the smallest and, with VNNI,
# the fastest variant; the --tune matrix starts from it.
ALL_INT4 = {"int8": [], "int8_edge_layers": 0, "lm_head_bits": 4}
ALL_INT4_NAME = "ours cpu-int4 all-int4 (every projection int4)"
PRUNED_NAME = "ours cpu-int4 pruned lm_head (last-position logits)"

# The cpu-int4 tuning matrix (`--tune`): name -> how it is built and run. "spec": QuantizeSpec overrides on the recipe's
# (our quantize stage); "builder": onnxruntime-genai builder int4 options; "session": genai session_options overlay.
NOSPIN = {"session.intra_op.allow_spinning": "0"}
TUNE = {
    "int4 recipe (asym b32 acc4, lm_head int4)": {"spec": {}},
    "int4 sym b32": {"spec": {"symmetric": True}},
    "int4 asym b64": {"spec": {"block_size": 64}},
    "int4 asym b128": {"spec": {"block_size": 128}},
    "int4 acc-level 0 (fp32 compute)": {"spec": {"accuracy_level": 0}},
    "int4 acc-level 1": {"spec": {"accuracy_level": 1}},
    "int4 lm_head int8": {"spec": {"lm_head_bits": 8}},
    "int4 lm_head fp32": {"spec": {"lm_head": False}},
    "int4 recipe + embedding int4": {"spec": {"embedding": "int4"}},
    "int4 asym b64 + embedding int4": {"spec": {"embedding": "int4", "block_size": 64}},
    "int4 recipe, no spinning": {"spec": {}, "session": NOSPIN},
    "int4 recipe, no mem arena": {"spec": {}, "session": {"enable_cpu_mem_arena": False}},
    "int4 recipe, KV buffer not shared": {"spec": {}, "search": {"past_present_share_buffer": False}},
    "int4 recipe, basic graph opts": {"spec": {}, "session": {"graph_optimization_level": "ORT_ENABLE_BASIC"}},
    "int4 sym b32, no spinning": {"spec": {"symmetric": True}, "session": NOSPIN},
    "int4 asym b64, no spinning": {"spec": {"block_size": 64}, "session": NOSPIN},
    "int4 lm_head int8, no spinning": {"spec": {"lm_head_bits": 8}, "session": NOSPIN},
    "int4 recipe + embedding int4, no spinning": {"spec": {"embedding": "int4"}, "session": NOSPIN},
    "int4 asym b64 + embedding int4, no spinning": {"spec": {"embedding": "int4", "block_size": 64}, "session": NOSPIN},
    "builder int4 defaults, no spinning": {"builder": (), "session": NOSPIN},
    "builder int4 defaults (sym b32 acc4)": {"builder": ()},
    "builder int4 + tied int4 embedding": {"builder": ("shared_embeddings=true",)},
}


def tune_models(merged: Path, recipe: str, names: list[str] | None = None) -> dict[str, dict]:
    from toolchain.config.catalog import load_recipe
    from toolchain.runtime.fsutil import sha256_file
    from toolchain.stages.quantize.nbits import quantize
    from toolchain.config.schema import QuantizeSpec

    root = WORK / f"ours-{sha256_file(merged / 'model.safetensors')[:12]}"
    fp32 = root / "export-fp32"
    if not (fp32 / "model.onnx").is_file():
        from toolchain.stages.export.decoder import export

        export(merged, fp32, exporter="genai")
    base = {**load_recipe(recipe)[0].quantize.model_dump(), **ALL_INT4}  # the names below describe int4 projections
    out = {}
    for name, v in TUNE.items():
        if names and not any(n in name for n in names):
            continue
        if "builder" in v:
            tag = "builder-int4" + "".join("-" + o.replace("=", "_") for o in v["builder"])
            path = builder_int4(merged, root / tag, tuple(v["builder"]))
        else:
            spec = QuantizeSpec(**{**base, **v["spec"]})
            tag = "int4-" + "-".join(f"{k}_{x}" for k, x in sorted(spec.model_dump().items()))
            path = root / "tune" / tag
            if not (path / "model.onnx").is_file():
                quantize(fp32, "cpu-int4", path, spec)
        out[name] = {"kind": "genai", "path": str(path), "session": v.get("session"), "search": v.get("search")}
    return out


def builder_int4(merged: Path, out: Path, options: tuple[str, ...] = ()) -> Path:
    """onnxruntime-genai's builder, int4 for the CPU EP, with its defaults (plus `options`)."""
    import tempfile

    from toolchain.stages.export.decoder import export_genai

    if not (out / "model.onnx").is_file():
        with tempfile.TemporaryDirectory(prefix="bench-build-") as work:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            export_genai(merged, tmp, "int4", Path(work), False, "cpu", options)
            tmp.rename(out)
    return out


def llama_models(merged: Path) -> dict[str, dict]:
    """The merged model as llama.cpp GGUFs: f32 by llama.cpp's converter, Q4_0 and Q4_K_M by llama.cpp's quantizer,
    with the toolchain's GGUF stage functions (stages/quantize/gguf.py: the converter from the llama-cpp-python
    sdist in TOOLCHAIN_HOME), the same code the gguf-* targets are built by."""
    import llama_cpp  # noqa: F401  (the runs below need it too)
    from toolchain.runtime.fsutil import sha256_file
    from toolchain.stages.quantize import gguf

    root = WORK / f"gguf-{sha256_file(merged / 'model.safetensors')[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    f32 = root / "merged-f32.gguf"
    if not f32.is_file():
        gguf.convert(merged, f32, "f32")
    out = {}
    for name in LLAMA_QUANTS:
        q = root / f"merged-{name}.gguf"
        if not q.is_file():
            gguf.quantize(f32, q, name.lower(), threads=2)
        out[f"llama.cpp {name}"] = {"kind": "llama", "path": str(q)}
    # llama.cpp's CPU threads are an OpenMP team (GGML_OPENMP, its default build), which spins while waiting; the
    # same Q4_0 with OpenMP's passive wait is the like-for-like comparison with our non-spinning session default.
    out["llama.cpp Q4_0 (OMP passive wait)"] = {"kind": "llama", "path": out["llama.cpp Q4_0"]["path"],
                                                "env": {"OMP_WAIT_POLICY": "PASSIVE"}}
    return out


def have_llama() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------- token id inputs


def inputs(merged: Path, recipe: str) -> dict:
    """Token ids shared by every runtime: prompts of the requested lengths cut from held-out text, and the quality
    sequences (held-out text chunks and held-out conversations with the chat template)."""
    from transformers import AutoTokenizer

    from toolchain.config.catalog import load_recipe

    tok = AutoTokenizer.from_pretrained(str(merged))
    text_rows = [json.loads(x) for x in (REPO / "recipes/data/domain-adapt/eval.jsonl").read_text().splitlines() if x]
    stream = []
    for r in text_rows:
        stream += tok(r["text"] + "\n\n")["input_ids"]
    rec, rec_file = load_recipe(recipe)
    chats = [json.loads(x) for x in (rec_file.parent / rec.data.eval).read_text().splitlines() if x]
    chat_ids = [tok.apply_chat_template(c["messages"], tokenize=True) for c in chats[:QUALITY_CHATS]]
    chat_ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in chat_ids]
    text_ids = [tok(r["text"])["input_ids"] for r in text_rows[-QUALITY_TEXT_CHUNKS:]]
    return {"prompt_stream": stream, "quality": {"text": text_ids, "chat": chat_ids}}


# ------------------------------------------------------------------------------------------------- speed workers


def _genai_model(path: str, threads: int, session: dict | None = None, search: dict | None = None):
    """The artifact with `threads` intra-op threads; `session`/`search`: genai_config overlays (a string-valued
    session option that is not one of onnxruntime-genai's own is passed to ONNX Runtime as a config entry)."""
    import onnxruntime_genai as og

    cfg = og.Config(path)
    cfg.clear_providers()
    so = {"intra_op_num_threads": threads, "inter_op_num_threads": 1, **(session or {})}
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": so}}, **({"search": search} if search else {})}))
    return og.Model(cfg)


def _genai_run(model, ids: list[int], new: int) -> dict:
    import numpy as np
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(ids) + new
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    t1 = time.perf_counter()
    gen.generate_next_token()
    toks = [int(gen.get_next_tokens()[0])]
    t2 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
    t3 = time.perf_counter()
    return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": t3 - t2, "new": len(toks), "tokens": toks}


class _Llama:
    def __init__(self, path: str, threads: int, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=logits_all, verbose=False)

    def _next(self) -> int:
        """Greedy: argmax of the last position's logits (Llama.eval keeps them only with logits_all)."""
        import llama_cpp
        import numpy as np

        ptr = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),))))

    def run(self, ids: list[int], new: int) -> dict:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = self._next()
        toks = [tok]
        t2 = time.perf_counter()
        while len(toks) < new:
            llm.eval([tok])
            tok = self._next()
            toks.append(tok)
        t3 = time.perf_counter()
        return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": t3 - t2, "new": len(toks), "tokens": toks}


class _Torch:
    def __init__(self, path: str, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.net = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    def run(self, ids: list[int], new: int) -> dict:
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.net(torch.tensor([ids]), use_cache=True)
            t1 = time.perf_counter()
            tok = int(out.logits[0, -1].argmax())
            toks, past = [tok], out.past_key_values
            t2 = time.perf_counter()
            while len(toks) < new:
                out = self.net(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
                toks.append(tok)
            t3 = time.perf_counter()
        return {"prefill_s": t1 - t0, "ttft_s": t2 - t0, "decode_s": t3 - t2, "new": len(toks), "tokens": toks}


def speed_worker(job: dict) -> dict:
    """One (runtime, threads): load, warm up, then `reps` timed runs per prompt length."""
    kind, path, threads = job["kind"], job["path"], job["threads"]
    prompts = job["prompts"]
    new = job["new_tokens"]
    t = time.perf_counter()
    if kind == "genai":
        model = _genai_model(path, threads, job.get("session"), job.get("search"))
        run = lambda ids: _genai_run(model, ids, new)  # noqa: E731
    elif kind == "llama":
        m = _Llama(path, threads, max(len(p) for p in prompts.values()) + new + 8)
        run = lambda ids: m.run(ids, new)  # noqa: E731
    elif kind == "torch":
        m = _Torch(path, threads)
        run = lambda ids: m.run(ids, new)  # noqa: E731
    else:
        raise ValueError(kind)
    load_s = time.perf_counter() - t
    res = {}
    for n, ids in prompts.items():
        run(ids)  # warm-up at this length
        runs = [run(ids) for _ in range(job["reps"])]
        res[n] = {"runs": [{k: v for k, v in r.items() if k != "tokens"} for r in runs], "tokens": runs[0]["tokens"],
                  "loadavg": loadavg()}
    return {"load_s": load_s, "by_prompt": res, "peak_rss_mb": peak_rss_mb()}


# ------------------------------------------------------------------------------------------------ quality workers


def quality_worker(job: dict) -> dict:
    """Score every quality sequence in one pass; the reference (fp32 torch) writes its logits, the others compare."""
    import numpy as np

    from toolchain.runtime.metrics import LogitStats

    kind, path, ref_dir = job["kind"], job["path"], Path(job["ref_dir"])
    seqs = job["sequences"]
    if kind == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(job["threads"])
        net = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

        def logits(ids):
            with torch.inference_mode():
                return net(torch.tensor([ids])).logits[0].float().numpy()
    elif kind == "genai":
        import onnxruntime_genai as og

        model = _genai_model(path, job["threads"])

        def logits(ids):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(ids) + 1)
            gen = og.Generator(model, params)
            gen.append_tokens(np.asarray(ids, dtype=np.int32))
            return np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
    elif kind == "llama":
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_ctx=max(len(s) for ss in seqs.values() for s in ss) + 8, n_batch=512,
                    n_ubatch=512, n_threads=job["threads"], n_threads_batch=job["threads"], logits_all=True,
                    verbose=False)

        def logits(ids):
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[: len(ids)], dtype=np.float32)
    else:
        raise ValueError(kind)
    out = {}
    for set_name, ss in seqs.items():
        stats = LogitStats()
        for i, ids in enumerate(ss):
            lg = logits(ids)
            f = ref_dir / f"{set_name}-{i}.npy"
            if job.get("write_ref"):
                np.save(f, lg)
                ref = lg
            else:
                ref = np.load(f)
            stats.update(ref[:-1], lg[:-1], np.asarray(ids[1:]))
        out[set_name] = stats.result()
    return {"quality": out, "loadavg": loadavg(), "peak_rss_mb": peak_rss_mb()}


def _spawn(mode: str, job: dict, env: dict | None = None) -> dict:
    e = {**os.environ, **(env or {})}
    r = subprocess.run([sys.executable, __file__, "--worker", mode], input=json.dumps(job), text=True,
                       capture_output=True, env=e)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-2000:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- summaries


def summarize(runs: list[dict], prompt_tokens: int) -> dict:
    """Median figures over timed runs (each: prefill_s, ttft_s, decode_s, new)."""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {"prefill_tok_s": prompt_tokens / med([r["prefill_s"] for r in runs]),
            "decode_tok_s": med([(r["new"] - 1) / r["decode_s"] for r in runs]),
            "ttft_ms": 1000 * med([r["ttft_s"] for r in runs]), "n_runs": len(runs)}


def table(results: dict, baseline: str = "llama.cpp Q4_0") -> str:
    """Markdown table: one row per runtime and thread count, speed at each prompt length, the decode and prefill
    ratio to `baseline` at the same threads and prompt, size, RSS and quality (text set)."""
    speed, quality = results["speed"], results.get("quality", {})
    prompts = sorted({int(p) for row in speed for p in row["by_prompt"]})
    head = ["runtime", "threads"]
    for p in prompts:
        head += [f"decode tok/s (p{p})", f"prefill tok/s (p{p})", f"TTFT ms (p{p})"]
    head += [f"decode vs {baseline} (p{prompts[0]})", f"prefill vs {baseline} (p{prompts[-1]})", "size MB",
             "peak RSS MB", "Δppl % text [95% interval]", "Δppl % chat", "top-1 agree text", "KL text"]
    base = {row["threads"]: row for row in speed if row["name"] == baseline}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x, spec=".0f"):
        return "–" if x is None else format(x, spec)

    for row in speed:
        cells = [row["name"], str(row["threads"])]
        for p in prompts:
            s = row["by_prompt"].get(str(p), {}).get("summary")
            cells += [fmt(s and s["decode_tok_s"]), fmt(s and s["prefill_tok_s"]), fmt(s and s["ttft_ms"])]
        b = base.get(row["threads"])

        def ratio(p, key):
            s = row["by_prompt"].get(str(p), {}).get("summary")
            bs = b and b["by_prompt"].get(str(p), {}).get("summary")
            return s[key] / bs[key] if s and bs else None

        cells += [fmt(ratio(prompts[0], "decode_tok_s"), ".2f") + ("×" if b else ""),
                  fmt(ratio(prompts[-1], "prefill_tok_s"), ".2f") + ("×" if b else ""),
                  fmt(row.get("size_mb"), ".1f"), fmt(row.get("peak_rss_mb"))]
        q = quality.get(row["name"], {})
        t, c = q.get("text"), q.get("chat")
        ci = t and t.get("delta_ppl_ci95_pct")
        cells += [fmt(t and t["delta_ppl_pct"], "+.2f") + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""),
                  fmt(c and c["delta_ppl_pct"], "+.2f"),
                  fmt(t and t["top1_agreement"], ".3f"), fmt(t and t["mean_kl"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = results["speed"]
    names = list(dict.fromkeys(r["name"] for r in speed))
    threads = sorted({r["threads"] for r in speed})
    prompts = sorted({int(p) for r in speed for p in r["by_prompt"]})
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.5 * len(names) + 2.5))
    for ax, (key, label, p) in zip(axes, [("decode_tok_s", "decode tok/s", prompts[0]),
                                          ("prefill_tok_s", "prefill tok/s", prompts[-1])]):
        h = 0.8 / len(threads)
        for j, t in enumerate(threads):
            vals = []
            for n in names:
                row = next((r for r in speed if r["name"] == n and r["threads"] == t), None)
                s = row and row["by_prompt"].get(str(p), {}).get("summary")
                vals.append(s[key] if s else 0)
            ax.barh([i + j * h for i in range(len(names))], vals, height=h, label=f"{t} thread(s)")
        ax.set_yticks([i + h * (len(threads) - 1) / 2 for i in range(len(names))], names)
        ax.invert_yaxis()
        ax.set_xlabel(f"{label}, {p}-token prompt")
        ax.legend()
    fig.suptitle(f"SmolLM2-135M merged, greedy {NEW_TOKENS} new tokens ({results['date']}, load {results['loadavg_start']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


# ------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--merged", help="merged fp32 HF folder (default: the recipe's pipeline stage)")
    ap.add_argument("--recipe", default="chat-lora")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompts", default="32,512")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--reps", type=int, default=2, help="timed runs per prompt per worker (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="times the whole configuration list is run, interleaved")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching runtimes")
    ap.add_argument("--tune", action="store_true", help="the cpu-int4 tuning matrix (TUNE) instead of our targets")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--build-only", action="store_true", help="build the models, measure nothing")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--quality-only", default="", help="comma-separated substrings: quality for matching runtimes only")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    if args.worker:
        job = json.loads(sys.stdin.read())
        res = {"speed": speed_worker, "quality": quality_worker}[args.worker](job)
        print(json.dumps(res))
        return

    date = datetime.date.today().isoformat()
    merged = merged_model(args)
    if args.tune:
        models = tune_models(merged, args.recipe, [s.strip() for s in args.only.split(",")] if args.only else None)
        args.only = ""
    else:
        models = ours(merged, args.recipe)
    # the quality reference, and a speed row (not in --tune). OpenMP's passive wait: with its default spinning, torch
    # decoded at ~2 tok/s on the shared 2-core CPU (bench/results/decode-tune-*.json, first tuning run)
    models["pytorch fp32"] = {"kind": "torch", "path": str(merged), "env": {"OMP_WAIT_POLICY": "PASSIVE"},
                              "no_speed": args.tune}
    llama_ok = have_llama() and not args.no_llama
    if llama_ok:
        models.update(llama_models(merged))
    elif not args.no_llama:
        print("llama-cpp-python is not installed (make bench installs it): llama.cpp rows skipped", file=sys.stderr)
    if args.only:  # the fp32 reference stays for quality, timed only when it matches
        keep = [s.strip() for s in args.only.split(",")]
        hit = lambda k: any(s in k for s in keep)  # noqa: E731
        models = {k: v if hit(k) else {**v, "no_speed": True} for k, v in models.items() if hit(k) or v["kind"] == "torch"}
    if args.build_only:
        print(json.dumps(models, indent=1))
        return
    ids = inputs(merged, args.recipe)
    lengths = [int(x) for x in args.prompts.split(",")]
    prompts = {str(n): ids["prompt_stream"][:n] for n in lengths}
    threads = [int(x) for x in args.threads.split(",")]
    import provenance

    results = {"date": date, "loadavg_start": loadavg(), "merged": str(merged), "recipe": args.recipe,
               "new_tokens": args.new_tokens, "reps": args.reps, "rounds": args.rounds, "cpu_count": os.cpu_count(),
               **provenance.fields(), "versions": versions(), "speed": [],
               "quality": {}}
    rows = {}
    for rnd in range(args.rounds):
        for name, m in models.items():
            if m.get("no_speed"):
                continue
            for t in threads:
                job = {"kind": m["kind"], "path": m["path"], "threads": t, "prompts": prompts,
                       "new_tokens": args.new_tokens, "reps": args.reps, "session": m.get("session"),
                       "search": m.get("search")}
                env = {"OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t), **m.get("env", {})}
                r = _spawn("speed", job, env)
                row = rows.setdefault((name, t), {"name": name, "threads": t, "kind": m["kind"], "path": m["path"],
                                                  "size_mb": model_size(m), "by_prompt": {}, "peak_rss_mb": 0,
                                                  "errors": []})
                if "error" in r:
                    row["errors"].append(r["error"])
                    print(f"[{rnd}] {name} t={t}: ERROR {r['error'][-300:]}", file=sys.stderr)
                    continue
                row["peak_rss_mb"] = max(row["peak_rss_mb"], r["peak_rss_mb"])
                for p, pr in r["by_prompt"].items():
                    slot = row["by_prompt"].setdefault(p, {"runs": [], "loadavg": [], "tokens": pr["tokens"]})
                    slot["runs"] += pr["runs"]
                    slot["loadavg"].append(pr["loadavg"])
                    slot["summary"] = summarize(slot["runs"], int(p))
                s = {p: round(v["summary"]["decode_tok_s"], 1) for p, v in row["by_prompt"].items()}
                print(f"[{rnd}] {name} t={t}: decode tok/s {s} load {loadavg()}", file=sys.stderr)
    results["speed"] = list(rows.values())
    for row in results["speed"]:  # greedy outputs against the fp32 reference, as a sanity figure
        ref = rows.get(("pytorch fp32", row["threads"]))
        for p, slot in row["by_prompt"].items():
            rt = ref and ref["by_prompt"].get(p, {}).get("tokens")
            if rt:
                same = 0
                for a, b in zip(slot["tokens"], rt):
                    if a != b:
                        break
                    same += 1
                slot["greedy_prefix_match_vs_torch"] = same
    if not args.no_quality:
        qkeep = [s.strip() for s in args.quality_only.split(",") if s.strip()]
        results["quality"] = quality({k: v for k, v in models.items() if not v.get("no_quality") and (
                                      not qkeep or v["kind"] == "torch" or any(s in k for s in qkeep))}, ids["quality"])
    results["loadavg_end"] = loadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"decode-tune-{date}" if args.tune else f"decode-{date}")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    md = table(results)
    stem.with_suffix(".md").write_text(md + "\n")
    plot(results, stem.with_suffix(".png"))
    print(md)
    print(f"\nwritten {stem}.json/.md/.png; load {results['loadavg_start']} -> {results['loadavg_end']}", file=sys.stderr)


def model_size(m: dict) -> float:
    if m["kind"] == "genai":
        return dir_size_mb(Path(m["path"]), "model.onnx*")
    if m["kind"] == "torch":
        return dir_size_mb(Path(m["path"]), "*.safetensors")
    return dir_size_mb(Path(m["path"]))


def quality(models: dict, seqs: dict, threads: int = 2) -> dict:
    ref_dir = WORK / "quality-ref"
    shutil.rmtree(ref_dir, ignore_errors=True)
    ref_dir.mkdir(parents=True)
    out = {}
    ref = next(m for n, m in models.items() if m["kind"] == "torch")
    r = _spawn("quality", {"kind": "torch", "path": ref["path"], "threads": threads, "ref_dir": str(ref_dir),
                           "sequences": seqs, "write_ref": True}, ref.get("env"))
    if "error" in r:
        raise SystemExit(f"fp32 reference failed: {r['error']}")
    out["pytorch fp32"] = {**r["quality"], "loadavg": r["loadavg"]}
    seen = {}
    for name, m in models.items():
        if m["kind"] == "torch":
            continue
        if m["path"] in seen:  # the same weights under other run settings: the same logits
            out[name] = out[seen[m["path"]]]
            continue
        seen[m["path"]] = name
        r = _spawn("quality", {"kind": m["kind"], "path": m["path"], "threads": threads, "ref_dir": str(ref_dir),
                               "sequences": seqs}, m.get("env"))
        out[name] = r if "error" in r else {**r["quality"], "loadavg": r["loadavg"]}
        q = r.get("quality", {}).get("text", {})
        print(f"quality {name}: {q} load {loadavg()}", file=sys.stderr)
    shutil.rmtree(ref_dir, ignore_errors=True)
    return out


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "torch", "transformers", "numpy"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


if __name__ == "__main__":
    main()
