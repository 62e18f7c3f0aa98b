"""Stage 1, encoders (classify-encoder, ner): LoRA on a BERT-style encoder plus a fully trained head (PEFT SEQ_CLS /
TOKEN_CLS), merged into a plain HF folder; torch scores of the base (random head) and the tuned model on the
held-out split. Tokenization and scoring are runtime/encoder.py's, as on the device.

Output folder: model/ (merged HF folder with tokenizer files), loss_log.jsonl, metrics.json.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from toolchain.hf.encoder import TASKS, head_class, torch_forward
from toolchain.runtime import encoder as rt
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir
from toolchain.stages.finetune.batching import lr_at, seed_everything

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]


def label_set(rows: list[dict], task: str) -> list[str]:
    if task == "classify":
        return sorted({r["label"] for r in rows})
    return ["O"] + sorted({t for r in rows for t in r["tags"]} - {"O"})


def finetune(src, rec, rec_file: Path, out: Path) -> dict:
    """Train, score base and tuned with torch, write out/model (merged HF folder) and out/metrics.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    

    spec, task, metric = rec.train, rec.task, rec.metric.name
    seed_everything(spec.seed)
    train = rt.read_rows(rec_file.parent / rec.data.train, task)
    if not rec.data.eval:
        raise ToolchainError(f"{rec_file}: key 'data.eval': encoder recipes need a held-out file")
    held = rt.read_rows(rec_file.parent / rec.data.eval, task)[: rec.metric.eval_limit]
    labels = label_set(train, task)
    unknown = {x for r in held for x in ([r["label"]] if task == "classify" else r["tags"])} - set(labels)
    if unknown:
        raise ToolchainError(f"{rec_file.parent / rec.data.eval}: labels never seen in train: {sorted(unknown)}")
    tok_file = src.path / rt.TOKENIZER
    if not tok_file.is_file():
        raise ToolchainError(f"{src.path}: no tokenizer.json (the encoder path reads the fast tokenizer file)")
    tok = rt.load_tokenizer(tok_file, rec.data.max_length)
    net = head_class(task).from_pretrained(src.path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                              label2id={x: i for i, x in enumerate(labels)}, use_safetensors=True)
    score = lambda m: rt.score(torch_forward(m), tok, held, task, metric, labels, rec.metric.batch_size)  # noqa: E731
    results = {"model": src.card.name, "recipe": rec.name, "metric": metric, "labels": labels, "base": score(net)}

    targets = rec.method.target_modules or src.card.lora_target_modules
    net = get_peft_model(net, LoraConfig(r=rec.method.r, lora_alpha=rec.method.alpha, lora_dropout=rec.method.dropout,
                                         target_modules=targets, task_type=TASKS[task][1]))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    label_ids = {x: i for i, x in enumerate(labels)}
    rng, order, log, t0 = np.random.default_rng(spec.seed), [], [], time.time()
    net.train()
    bar = tqdm(range(spec.max_steps), desc=f"finetune {src.card.name} + {task} head")
    for step in bar:
        if len(order) < spec.batch_size:
            order += list(rng.permutation(len(train)))
        rows, order = [train[i] for i in order[: spec.batch_size]], order[spec.batch_size:]
        b = rt.encode(tok, rows, task)
        y = (np.array([label_ids[r["label"]] for r in rows]) if task == "classify"
             else rt.token_labels(b, rows, label_ids))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        loss = net(**{k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "token_type_ids")},
                   labels=torch.from_numpy(y)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": round(loss.item(), 5)})
        bar.set_postfix(loss=f"{log[-1]['loss']:.3f}")
    merged = net.merge_and_unload()
    merged.eval()
    results["train"] = {"steps": spec.max_steps, "seconds": round(time.time() - t0, 1), "final_loss": log[-1]["loss"],
                        "trainable_params": sum(p.numel() for p in params)}
    results["tuned"] = score(merged)
    with atomic_dir(Path(out)) as tmp:
        merged.save_pretrained(tmp / "model", safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (src.path / f).is_file():
                shutil.copy2(src.path / f, tmp / "model" / f)
        (tmp / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


