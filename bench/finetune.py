"""Fine-tuning throughput on CPU: our loop (LoRA fp32, the fast path, bf16 base, QLoRA, DoRA) against a plain
transformers Trainer + PEFT LoRA fp32 baseline, on the same model, data, LoRA settings and number of examples.

    .venv/bin/python bench/finetune.py [--steps 10] [--model smollm2-135m]

Each configuration runs in its own process (peak RSS is its own) with OMP_WAIT_POLICY=PASSIVE, so that CPU time
counts work rather than spinning when the machine is shared. Figures: real (non-padding) tokens per second of
wall time and per CPU second, peak RSS, the mean loss of the last 3 steps and the held-out loss after training.
Results go to bench/results/finetune-<date>.json and a markdown table on stdout. Compare ratios within one run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from toolchain.runtime.memory import peak_rss_mb  # noqa: E402

# name -> recipe overrides (None: the Trainer baseline). All start from recipes/chat-lora.yaml.
CONFIGS = {
    "trainer-fp32 (baseline)": None,
    "lora-fp32": {"train": {"bf16": "off"}},
    # the recipe as shipped: the fast path (bf16 frozen base where the CPU multiplies bf16, eager attention on CPU,
    # loss on the trained positions only)
    "lora (default fast path)": {},
    # ... plus packing: 4 blocks of up to 256 tokens hold about as many examples as 8 padded ones
    "lora + packing": {"train": {"batch_size": 4}, "data": {"packing": True, "max_length": 256}},
    "qlora": {"method": {"type": "qlora"}},
    "dora": {"method": {"type": "dora"}},
}
EVAL_EXAMPLES = 32


def recipe_with(overrides: dict, steps: int, folder: Path) -> Path:
    rec = yaml.safe_load((REPO / "recipes/chat-lora.yaml").read_text())
    data = REPO / "recipes/data/chat-lora"
    rec["data"].update(train=str(data / "train.jsonl"), eval=str(data / "eval.jsonl"))
    for k, v in (overrides or {}).items():
        rec[k].update(v)
    rec["train"].update(max_steps=steps, checkpoint_every=0)
    p = folder / "recipe.yaml"
    p.write_text(yaml.safe_dump(rec))
    return p


def heldout_loss(net, tok, ds) -> float:
    from toolchain.hf.evaluate import heldout_nll

    nll, n = heldout_nll(net, ds.eval[:EVAL_EXAMPLES], tok.pad_token_id)
    return nll / n


def run_ours(model: str, recipe: Path, out: Path) -> dict:
    from peft import PeftModel

    from toolchain.hf import data as data_mod
    from toolchain.config.catalog import load_recipe
    from toolchain.stages.finetune.decoder import finetune
    from toolchain.hf.models import load_causal_lm, load_tokenizer
    from toolchain.config.sources import resolve

    src = resolve(model)
    rec, rec_file = load_recipe(str(recipe))
    res = finetune(src, rec, rec_file, out, evaluate=False)
    tok = load_tokenizer(src.path)
    net = PeftModel.from_pretrained(load_causal_lm(src.path), out / "adapter")
    t = res["train"]
    return {"tokens_per_s": t["tokens_per_s"], "tokens_per_cpu_s": t["tokens_per_s"] * t["seconds"] / t["cpu_seconds"],
            "train_s": t["seconds"], "precision": t["precision"], "losses": _losses(out),
            "heldout_loss": heldout_loss(net, tok, data_mod.load(rec, rec_file, tok))}


def run_trainer(model: str, recipe: Path, out: Path) -> dict:
    """transformers Trainer + PEFT LoRA, fp32, as its documentation sets it up: padded batches, the model's own
    loss over every position. Same examples in the same order as our loop (sequential sampler)."""
    import torch
    from peft import get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from toolchain.hf import data as data_mod
    from toolchain.config.catalog import load_recipe
    from toolchain.stages.finetune.batching import step_indices
    from toolchain.hf.models import load_causal_lm, load_tokenizer
    from toolchain.stages.finetune.methods import lora_config
    from toolchain.config.sources import resolve

    rec, rec_file = load_recipe(str(recipe))
    src = resolve(model)
    tok = load_tokenizer(src.path)
    ds = data_mod.load(rec, rec_file, tok)
    spec = rec.train
    order = [i for s in range(spec.max_steps) for i in step_indices(len(ds.train), spec.batch_size, spec.seed, s)]
    train = [{"input_ids": ds.train[i]["input_ids"], "labels": ds.train[i]["labels"]} for i in order]
    torch.manual_seed(spec.seed)
    net = get_peft_model(load_causal_lm(src.path), lora_config(rec.method, src.card.lora_target_modules))

    class Seq(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset or self.train_dataset)

    losses, clock = [], {}

    class Log(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["t"], clock["c"] = time.time(), time.process_time()

        def on_log(self, args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=spec.batch_size, max_steps=spec.max_steps,
                             learning_rate=spec.lr, warmup_steps=spec.warmup_steps, lr_scheduler_type="cosine",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=spec.seed,
                             dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True)
    trainer = Seq(model=net, args=args, train_dataset=train, callbacks=[Log()],
                  data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    trainer.train()
    wall, cpu = time.time() - clock["t"], time.process_time() - clock["c"]
    tokens = sum(len(e["input_ids"]) for e in train)
    net.eval()
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "train_s": wall, "precision": "fp32",
            "losses": losses, "heldout_loss": heldout_loss(net, tok, ds)}


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "loss_log.jsonl").read_text().splitlines()]


def child(name: str, model: str, steps: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        rec = recipe_with(CONFIGS[name], steps, Path(d))
        fn = run_trainer if CONFIGS[name] is None else run_ours
        res = fn(model, rec, Path(d) / "out")
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", nargs="*", default=None, help="run these configurations only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.model, a.steps)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
    results = {}
    for name in a.only or CONFIGS:
        print(f"== {name}", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, __file__, "--child", name, "--model", a.model, "--steps", str(a.steps)],
                           env=env, stdout=subprocess.PIPE, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        results[name] = json.loads(line[-1][7:]) if r.returncode == 0 and line else {"error": f"exit {r.returncode}"}
    base = results.get("trainer-fp32 (baseline)", {})
    rows = ["| configuration | precision | tok/s | tok/CPU-s | vs baseline (CPU-s) | peak RSS MB | last-3 loss | held-out loss |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            rows.append(f"| {name} | {r['error']} |||||||")
            continue
        ratio = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"] if base.get("tokens_per_cpu_s") else float("nan")
        last = sum(r["losses"][-3:]) / len(r["losses"][-3:])
        rows.append(f"| {name} | {r['precision']} | {r['tokens_per_s']:.0f} | {r['tokens_per_cpu_s']:.0f} | {ratio:.2f}x | "
                    f"{r['peak_rss_mb']:.0f} | {last:.3f} | {r['heldout_loss']:.3f} |")
    table = "\n".join(rows)
    print(table)
    out = REPO / "bench/results" / f"finetune-{datetime.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import fields

    out.write_text(json.dumps({**fields(), "model": a.model, "steps": a.steps, "host_cpus": os.cpu_count(),
                               "load_avg_at_end": os.getloadavg(), "results": results, "table": table}, indent=2))
    print(f"written: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
