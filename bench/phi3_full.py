"""Phi-3-mini at its real size on this machine: each stage's wall time and peak RSS, in its own process.

    .venv/bin/python bench/phi3_full.py [--work /tmp/phi3-full] [--stages make,finetune-lora,...] [--limit-gb 20]

Phi-3 weights cannot be had here, so `make` writes a random-weight model with Phi-3-mini-4k-instruct's exact shapes
(3.8B parameters, bf16 safetensors in shards of about 2 GB, written one shard at a time) and a small byte-level
BPE tokenizer (its ids fit inside the real 32064-id vocabulary). Every later stage runs in a fresh process, so its
peak RSS (VmHWM) is its own; a watchdog kills a stage whose resident memory passes --limit-gb, and the result says
so (the other jobs on this 24 GB machine keep running). Results: bench/results/phi3-full-<date>.json and a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# microsoft/Phi-3-mini-4k-instruct config.json (the published file's shape fields)
PHI3_MINI = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                 original_max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=2047,
                 rope_scaling=None, tie_word_embeddings=False, hidden_act="silu")
SHARD_BYTES = 2 * 1024**3
# one step of batch 2 (the figure is seconds per step) and a 2-example generation eval, on 8 held-out examples
EDGE_SETS = ("train.batch_size=2", "metric.eval_limit=2", "train.checkpoint_every=0")
EDGE_COMMAND = ("toolchain edge --model phi-3-mini --model-path {model} --recipe chat-lora --max-steps 1 "
                "--eval-data {eval} --out {out} " + " ".join(f"--set {s}" for s in EDGE_SETS))


def make(out: Path) -> dict:
    """The random-weight full-size model, one shard in memory at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import Phi3Config, Phi3ForCausalLM

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import PHI3_SPECIALS, PHI3_TEMPLATE  # noqa: E402

    tok = _tokenizer(PHI3_SPECIALS, PHI3_TEMPLATE)
    cfg = Phi3Config(**PHI3_MINI, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape)) for k, v in Phi3ForCausalLM(cfg).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shards, cur, size, index = [], {}, 0, {}

    def flush():
        nonlocal cur, size
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(cur, str(out / name), metadata={"format": "pt"})
        shards.append(name)
        index.update({k: name for k in cur})
        cur, size = {}, 0

    for k, shape in shapes.items():
        t = torch.ones(shape, dtype=torch.bfloat16) if k.endswith("norm.weight") else \
            (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        cur[k] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    if cur:
        flush()
    n = len(shards)
    for i, name in enumerate(shards):  # the HF naming: model-0000i-of-0000n
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(out / name, out / final)
        index = {k: (final if v == name else v) for k, v in index.items()}
    total = sum(int(torch.Size(s).numel()) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}, indent=1))
    cfg.architectures = ["Phi3ForCausalLM"]  # as the published config.json has it (the builder dispatches on it)
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return {"params": sum(int(torch.Size(s).numel()) for s in shapes.values()), "bytes": total, "shards": n}


def _tokenizer(specials, template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = []
    for f in sorted((REPO / "recipes/data").glob("*/train.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            corpus += [m["content"] for m in row.get("messages", [])] + [v for k, v in row.items() if isinstance(v, str)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=4000, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=template,
                                   additional_special_tokens=specials[1:])


def _recipe(work: Path, method: str, steps: int = 1):
    """chat-lora as shipped, one step of batch 2 (the figure is seconds per step), a 2-example eval."""
    from toolchain.config.catalog import open_recipe

    return open_recipe("chat-lora", max_steps=steps, method=method,
                       sets=("train.batch_size=2", "metric.eval_limit=2", "train.checkpoint_every=0"))


def stage(name: str, work: Path) -> dict:
    """One stage on the full-size model, in this process."""
    from toolchain.config.sources import resolve

    model = work / "model"
    if name == "make":
        return make(model)
    src = resolve("phi-3-mini", str(model))
    if name in ("finetune-lora", "finetune-qlora"):
        from toolchain.config.schema import Launch
        from toolchain.stages.finetune.decoder import finetune

        loaded = _recipe(work, name.split("-")[1])
        t0 = time.time()
        rep = finetune(src, loaded.recipe, loaded.file, work / name, evaluate=False, launch=Launch())
        return {"seconds_total": round(time.time() - t0, 1), "train": rep.get("train"),
                "step_seconds": rep.get("step_seconds") or rep.get("train", {}).get("seconds_per_step")}
    if name == "edge":  # the whole chain as a user runs it, in one process: the engine's per-stage cost
        from toolchain import pipeline

        eval_file = work / "eval8.jsonl"
        eval_file.write_text("".join((REPO / "recipes/data/chat-lora/eval.jsonl").read_text().splitlines(True)[:8]))
        rep = pipeline.edge("phi-3-mini", "chat-lora", target="cpu-int4", out=work / "artifacts", max_steps=1,
                            model_path=str(model), eval_data=str(eval_file), sets=EDGE_SETS)
        h = rep["headline"]
        return {"command": EDGE_COMMAND.format(model=model, eval=eval_file, out=work / "artifacts"),
                "status": rep["status"], "gates": rep.get("gates"), "size_mb": h["size_mb"],
                "fp32_size_mb": h["fp32_size_mb"], "decode_tok_s": h["decode_tok_s"], "stages": h["stages"],
                "delta_perplexity_vs_fp32_pct": h["delta_perplexity_vs_fp32_pct"],
                "metric": {k: h[k] for k in ("metric", "base_torch", "tuned_torch", "onnx_fp32", "artifact_metric")}}
    if name == "merge":
        from toolchain.stages.merge import merge

        return merge(src, work / "finetune-lora", work / "merged")
    if name == "reference-torch":
        import torch

        from toolchain.hf import data as data_mod
        from toolchain.hf.evaluate import heldout_nll
        from toolchain.hf.models import load_causal_lm, load_tokenizer

        loaded = _recipe(work, "lora")
        tok = load_tokenizer(work / "merged")
        ds = data_mod.load(loaded.recipe, loaded.file, tok)
        m = load_causal_lm(work / "merged", dtype=torch.bfloat16)
        nll, n = heldout_nll(m, ds.eval[:8], tok.pad_token_id, batch_size=4)
        return {"examples": 8, "tokens": n, "nll": nll, "dtype": "bfloat16"}
    if name == "export-builder-int4":
        return _builder_int4(work)
    raise SystemExit(f"unknown stage {name}")


def _builder_int4(work: Path) -> dict:
    """onnxruntime-genai's builder, int4 for the CPU EP, straight from the merged folder (what a user would run)."""
    from toolchain.stages.export.decoder import export_genai

    out = work / "builder-int4"
    out.mkdir(parents=True, exist_ok=True)
    (work / "builder-cache").mkdir(exist_ok=True)
    export_genai(work / "merged", out, "int4", work / "builder-cache", False, "cpu", ("is_symmetric=true", "block_size=32"))
    return {"size_mb": round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6, 1)}


def _run_child(name: str, work: Path, limit_gb: float) -> dict:
    """Run one stage in a child process; sample its RSS; kill it past limit_gb."""
    cmd = [sys.executable, __file__, "--work", str(work), "--child", name]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak, killed = 0.0, False

    def watch():
        nonlocal peak, killed
        while p.poll() is None:
            try:
                rss = int(next(x for x in Path(f"/proc/{p.pid}/status").read_text().splitlines()
                               if x.startswith("VmRSS:")).split()[1]) / 1024**2
            except (OSError, StopIteration):
                break
            peak = max(peak, rss)
            if rss > limit_gb:
                killed = True
                p.kill()
            time.sleep(0.2)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    stdout, _ = p.communicate()
    th.join()
    res = {"stage": name, "seconds": round(time.time() - t0, 1), "rc": p.returncode}
    if killed:
        res.update(status=f"killed by the watchdog at {limit_gb} GB RSS", peak_rss_gb=round(peak, 2))
        return res
    try:
        res.update(json.loads(stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        res.update(status="failed", peak_rss_gb=round(peak, 2))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/phi3-full"))
    ap.add_argument("--stages", default="make,finetune-lora,finetune-qlora,merge,reference-torch,export-builder-int4")
    ap.add_argument("--limit-gb", type=float, default=20.0)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        from toolchain.runtime.memory import peak_rss_mb

        out = stage(a.child, a.work)
        print(json.dumps({"status": "ok", "result": out, "peak_rss_gb": round(peak_rss_mb() / 1024, 2)}, default=str))
        return
    from provenance import fields

    results = [_run_child(s, a.work, a.limit_gb) for s in a.stages.split(",")]
    for r in results:
        print(f"| {r['stage']} | {r['seconds']} s | {r.get('peak_rss_gb')} GB | {r.get('status')} |", flush=True)
    day = datetime.date.today().isoformat()
    f = REPO / "bench/results" / f"phi3-full-{day}.json"
    old = json.loads(f.read_text())["stages"] if f.is_file() else []
    done = {r["stage"] for r in results}
    f.write_text(json.dumps({**fields(), "model": PHI3_MINI,
                             "stages": [r for r in old if r["stage"] not in done] + results}, indent=2, default=str))


if __name__ == "__main__":
    main()
