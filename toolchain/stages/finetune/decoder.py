"""Stage 1: fine-tune a model by the recipe's method (LoRA, QLoRA, DoRA, rsLoRA, full), on the CPU by default.

Output folder:
    adapter/          the PEFT adapter (safetensors + adapter_config.json); model/ instead for a full fine-tune
    recipe.yaml       the recipe as resolved (defaults filled in, data paths absolute)
    loss_log.jsonl    one line per step: step, loss, lr
    greedy_tokens.json  the tuned model's greedy token ids for each generated held-out answer (the reference's)
    metrics.json      held-out scores of the base model and of the tuned model (torch, fp32 weights)

A run writes a checkpoint every `train.checkpoint_every` steps beside its output (<out>.ckpt/); a run started
again with the same inputs resumes from it, with the same losses as a run that was never interrupted.
Under `--launcher deepspeed` the same function runs in every rank (distributed.py, worker.py); rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from toolchain.hf import data as data_mod
from toolchain.stages.finetune import distributed as dist_mod
from toolchain.stages.finetune import methods
from toolchain.stages.finetune import replay as replay_mod
from toolchain.hf import retention as retention_mod
from toolchain.runtime import retention as rt_retention
from toolchain.config.catalog import RETENTION_SET, home
from toolchain.config.schema import Launch, Recipe
from toolchain.runtime.errors import ToolchainError
from toolchain.hf.evaluate import score
from toolchain.runtime.fsutil import atomic_dir
from toolchain.hf.models import bf16_fast, collate, compute_dtype, load_causal_lm, load_tokenizer, working_dtype
from toolchain.config.sources import Resolved
from toolchain.stages.finetune.batching import causal_lm_loss, lr_at, micro_batches, seed_everything, step_indices, trained_tokens
from toolchain.stages.finetune.checkpoint import Checkpoint


GREEDY_FILE = "greedy_tokens.json"


def _bf16_base(mode: str, method: str) -> bool:
    if method in ("qlora", "full"):
        return False  # qlora computes in its own compute dtype; a full fine-tune trains every weight in fp32
    return mode == "on" or (mode == "auto" and bf16_fast())


def finetune(src: Resolved, rec: Recipe, rec_file: Path, out: Path, *, evaluate: bool = True,
             launch: Launch = Launch()) -> dict:
    """Train `rec` (command-line overrides already applied) on the resolved model; returns the metrics written to
    out/metrics.json. `rec_file`: the recipe's file (open_recipe has made the data paths absolute and pointed them at
    the user's files for --data / --eval-data).

    launch.launcher "deepspeed" starts launch.nproc ranks (on each of launch.nnodes nodes) running this same function
    under DeepSpeed ZeRO-`launch.zero`, through torch.distributed.run (distributed.py)."""
    if launch.launcher == "deepspeed" and not dist_mod.in_worker():
        replay_mod.rows(src, rec, rec_file, load_tokenizer(src.path, src.trust_remote_code))  # cached before the ranks read it
        return dist_mod.launch(src, rec, rec_file, out, evaluate=evaluate, launch=launch)
    rank, world = dist_mod.rank_world()
    lead = rank == 0
    zero, trust_remote_code = launch.zero, src.trust_remote_code
    spec, method = rec.train, rec.method
    tok = load_tokenizer(src.path, trust_remote_code)
    dtype = working_dtype(src.path)  # fp32; a large model's own dtype (an fp32 Phi-3-mini is 15 GB)
    shared = _Once(lambda: load_causal_lm(src.path, trust_remote_code, dtype=dtype))  # replay, base scores, training
    replay_rows, replay_info = replay_mod.rows(src, rec, rec_file, tok, load_base=shared)
    ds = data_mod.load(rec, rec_file, tok, replay=replay_rows)
    general = retention_mod.read_items(RETENTION_SET)
    micro_batches(list(range(spec.batch_size)), 0, world, spec.grad_accum)  # fail fast on a bad split
    bf16 = _bf16_base(spec.bf16, method.type) and world == 1  # ranks train an fp32 base: ZeRO flattens one dtype
    out = Path(out)
    ckpt = Checkpoint(out.parent / f"{out.name}.ckpt", _run_key(src, rec, ds, world, zero if world > 1 else None))
    state = ckpt.load() if lead or world == 1 else None
    results = state["results"] if state else {"model": src.card.name, "recipe": rec.name, "metric": rec.metric.name,
                                              "method": method.type, "replay": replay_info}
    seed_everything(spec.seed)
    if evaluate and lead and "base" not in results:  # the base in that dtype, whatever trains on top of it
        results["base"] = _base_score(shared, tok, rec, ds, src, general)
    if method.type == "qlora":
        shared.drop()  # freed before the NF4 copy loads
        net = methods.load_nf4(src.path, method, trust_remote_code)
    else:
        net = shared()
    net = methods.trainable(net, method, src.card.lora_target_modules, bf16, spec.gradient_checkpointing)
    params = [p for p in net.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    engine = dist_mod.wrap(net, spec, zero) if world > 1 else None
    opt = engine.optimizer if engine else torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    start, log = 0, []
    if state and world == 1:
        start, log = ckpt.restore(state, net, opt)
        print(f"resuming from the checkpoint at step {start} in {ckpt.folder}", flush=True)
    base_dtype = torch.bfloat16 if bf16 else dtype
    precision = "nf4+" + compute_dtype(method.compute_dtype) if method.type == "qlora" else \
        {torch.bfloat16: "bf16 base", torch.float16: "fp16 base"}.get(base_dtype, "fp32")

    net.train()
    length = (lambda i: len(ds.train[i]["input_ids"])) if spec.sort_micro_batches else None
    t0, cpu0, tokens = time.time(), time.process_time(), 0
    bar = tqdm(range(start, spec.max_steps), desc=f"finetune {src.card.name} {method.type} ({precision})",
               initial=start, total=spec.max_steps, disable=not lead)
    for step in bar:
        idx = step_indices(len(ds.train), spec.batch_size, spec.seed, step)
        denom = trained_tokens([ds.train[i] for i in idx])
        lr = lr_at(step, spec)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for mb in micro_batches(idx, rank, world, spec.grad_accum, length):
            batch = collate([ds.train[i] for i in mb], tok.pad_token_id)
            # summed token loss over the step's trained tokens: the same gradient however the batch is cut
            loss = causal_lm_loss(net, batch, reduction="sum") / denom
            if engine:
                dist_mod.backward(engine, loss, world, spec.grad_accum)
            else:
                loss.backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        if engine:
            loss_sum = dist_mod.all_sum(loss_sum)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "loss": round(loss_sum, 5), "lr": lr})
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if world == 1 and spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.max_steps:
            ckpt.save(step + 1, net, opt, log, results)
    train_s, cpu_s = time.time() - t0, time.process_time() - cpu0
    tokens = dist_mod.all_sum(tokens) if engine else tokens
    net.eval()
    trained = net
    if engine:  # rank 0 goes on with a plain copy of the trained model; every rank takes part in the gather
        state_dict = dist_mod.trained_state(engine)
        if not lead:
            dist_mod.barrier()
            return {}
        trained = _fresh(src, method, trust_remote_code, state_dict)
    if bf16:
        trained.to(dtype)  # score what the merge will build: the base in its working dtype + adapter
    results["train"] = {"steps": spec.max_steps, "resumed_from_step": start, "seconds": round(train_s, 1),
                        "tokens_per_s": round(tokens / max(train_s, 1e-9), 1), "precision": precision,
                        "ranks": world, "zero": zero if world > 1 else None, "grad_accum": spec.grad_accum,
                        "final_loss": log[-1]["loss"], "trainable_params": n_trainable}
    if world == 1:
        results["train"]["cpu_seconds"] = round(cpu_s, 1)
    greedy = []  # the tuned model's greedy answer tokens, for the reference stage
    if evaluate:
        # drift first: it switches the adapter off for the base's logits, and unfolding a bf16 base (a large
        # model's working dtype) does not give back its weights to the last bit
        base = load_causal_lm(src.path, trust_remote_code) if method.type == "full" else None
        drift = retention_mod.drift(trained, tok, general, base)
        del base
        with methods.folded(trained, method):
            results["tuned"] = score(trained, tok, rec, ds, desc="tuned model eval", tokens=greedy)
            results["tuned"].update(retention_mod.retention(trained, tok, general, desc="tuned model retention"))
        results["tuned"].update(drift)
    with atomic_dir(out) as tmp:
        folder = tmp / ("model" if method.type == "full" else "adapter")
        trained.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        resolved = rec.model_dump()
        resolved["model"] = src.card.name
        for key in ("train", "eval"):
            if resolved["data"][key]:
                resolved["data"][key] = str((rec_file.parent / resolved["data"][key]).resolve())
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (tmp / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        if greedy:  # stages/reference.py reads them
            (tmp / GREEDY_FILE).write_text(json.dumps(greedy))
        results["base_model_path"] = str(src.path)
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2))
    shutil.rmtree(ckpt.folder, ignore_errors=True)
    if engine:
        dist_mod.barrier()
    return results


class _Once:
    """A model loaded on first call and kept for the later ones, until drop()."""

    def __init__(self, load):
        self.load, self.model = load, None

    def __call__(self):
        if self.model is None:
            self.model = self.load()
        return self.model

    def drop(self) -> None:
        self.model = None


def _fresh(src, method, trust_remote_code: bool, state_dict: dict):
    """A single-process model of `method` holding trained weights (from the DeepSpeed ranks)."""
    net = methods.load_nf4(src.path, method, trust_remote_code) if method.type == "qlora" else load_causal_lm(src.path, trust_remote_code)
    net = methods.trainable(net, method, src.card.lora_target_modules, bf16_base=False, checkpointing=False)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in state_dict:
                p.copy_(state_dict.pop(n))
    if state_dict:
        raise ToolchainError(f"DeepSpeed returned weights the model does not have: {sorted(state_dict)[:3]}")
    return net.eval()


def _weights_stamp(src) -> str:
    """The base weights by path, size and modification time: cheap, and changes when the files do."""
    return "".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in sorted(src.path.glob("*.safetensors")))


def _base_score(load_base, tok, rec, ds, src, general: list[dict]) -> dict:
    """The base model's held-out scores and its retention on `general`, cached by what they depend on (weights,
    tokenized eval split, metric, the retention set and settings): every method and run of a recipe shares them.
    load_base() gives the base in its working dtype when they must be computed."""
    h = hashlib.sha256(json.dumps([ds.eval, [r.model_dump() for r in ds.eval_rows], rec.metric.model_dump(), general,
                                   rt_retention.SYSTEM, rt_retention.MAX_NEW_TOKENS], sort_keys=True).encode())
    h.update(_weights_stamp(src).encode())
    cache = home() / "evals" / f"base-{h.hexdigest()[:16]}.json"
    if cache.is_file():
        print(f"base model scores: cached in {cache}", flush=True)
        return json.loads(cache.read_text())
    base = load_base()
    scores = score(base, tok, rec, ds, desc="base model eval", stop_at_mismatch=True)
    scores.update(retention_mod.retention(base, tok, general, desc="base model retention"))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(scores))
    os.replace(tmp, cache)
    return scores


def _run_key(src, rec, ds, world: int, zero) -> str:
    """What a checkpoint must match to be resumed: model weights, recipe, tokenized data, ranks."""
    h = hashlib.sha256(json.dumps([src.card.name, str(src.path), rec.model_dump(), ds.train, world, zero],
                                  sort_keys=True, default=str).encode())
    h.update(_weights_stamp(src).encode())
    return h.hexdigest()[:16]
