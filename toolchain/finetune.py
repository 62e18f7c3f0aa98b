"""Stage 1: fine-tune a model with a PEFT LoRA adapter, on the CPU by default.

Output folder:
    adapter/          the PEFT adapter (safetensors + adapter_config.json)
    recipe.yaml       the recipe as resolved (defaults filled in)
    loss_log.jsonl    one line per step: step, loss, lr
    metrics.json      held-out scores of the base model and of the tuned model (torch)
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from . import data as data_mod
from .catalog import load_recipe
from .data import IGNORE
from .evaluate import score
from .fsutil import atomic_dir
from .hf import bf16_fast, collate, load_causal_lm, load_tokenizer
from .sources import resolve


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(mode: str):
    use = mode == "on" or (mode == "auto" and bf16_fast())
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if use else contextlib.nullcontext()
    return ctx, use


def _lr_at(step: int, spec) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    t = (step - spec.warmup_steps) / max(1, spec.max_steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def causal_lm_loss(net, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy computed only where labels carry loss.

    Equal to the model's own loss, but the output projection runs on the few trained positions instead of every
    position: with a 49k vocabulary and chat data where most tokens are prompt, that is most of the lm_head work.
    """
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep])


def finetune(model: str, recipe: str, out: Path, data: Optional[Path] = None, max_steps: Optional[int] = None,
             model_path: Optional[str] = None, trust_remote_code: bool = False, evaluate: bool = True) -> dict:
    """Train a LoRA adapter for `recipe` on `model`; returns the metrics written to out/metrics.json."""
    from peft import LoraConfig, get_peft_model

    rec, rec_file = load_recipe(recipe)
    if max_steps:
        rec.train.max_steps = max_steps
    src = resolve(model, model_path, trust_remote_code)
    spec = rec.train
    seed_everything(spec.seed)
    tok = load_tokenizer(src.path, trust_remote_code)
    ds = data_mod.load(rec, rec_file, tok, Path(data) if data else None)
    net = load_causal_lm(src.path, trust_remote_code)

    results = {"model": src.card.name, "recipe": rec.name, "metric": rec.metric.name}
    if evaluate:
        results["base"] = score(net, tok, rec, ds, desc="base model eval")

    targets = rec.method.target_modules or src.card.lora_target_modules or "all-linear"
    targets = "all-linear" if targets == ["all-linear"] else targets
    lcfg = LoraConfig(r=rec.method.r, lora_alpha=rec.method.alpha, lora_dropout=rec.method.dropout,
                      target_modules=targets, task_type="CAUSAL_LM")
    net = get_peft_model(net, lcfg)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    autocast, used_bf16 = _autocast(spec.bf16)
    rng = random.Random(spec.seed)
    order: list[int] = []
    log, t0, tokens = [], time.time(), 0

    with atomic_dir(Path(out)) as tmp:
        net.train()
        bar = tqdm(range(spec.max_steps), desc=f"finetune {src.card.name} ({'bf16' if used_bf16 else 'fp32'})")
        for step in bar:
            if len(order) < spec.batch_size:  # reshuffle each epoch
                more = list(range(len(ds.train)))
                rng.shuffle(more)
                order += more
            batch = collate([ds.train[i] for i in order[: spec.batch_size]], tok.pad_token_id)
            order = order[spec.batch_size:]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, spec)
            with autocast:
                loss = causal_lm_loss(net, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum())
            loss_v = loss.item()
            log.append({"step": step + 1, "loss": round(loss_v, 5), "lr": opt.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{loss_v:.3f}")
        net.eval()
        train_s = time.time() - t0
        results["train"] = {"steps": spec.max_steps, "seconds": round(train_s, 1), "tokens_per_s": round(tokens / train_s, 1),
                            "bf16_autocast": used_bf16, "final_loss": log[-1]["loss"],
                            "trainable_params": sum(p.numel() for p in params)}
        if evaluate:
            results["tuned"] = score(net, tok, rec, ds, desc="tuned model eval")

        net.save_pretrained(tmp / "adapter", safe_serialization=True)
        tok.save_pretrained(tmp / "adapter")
        resolved = rec.model_dump()
        resolved["model"] = src.card.name
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (tmp / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        results["base_model_path"] = str(src.path)
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2))
    return results
