"""Stage 2: merge an adapter into the full-precision base and check the merge changed nothing.

Writes an HF folder (safetensors, tokenizer, chat template, generation config) and merge_report.json with the
max-abs logit difference between base+adapter and the merged model on a few prompts; above 1e-3 it fails and
writes nothing. A QLoRA adapter was trained against the NF4 base but is merged into full-precision weights
(merging into 4-bit weights would round the adapter away): the fp32 base, or the NF4 weights dequantized to fp32
(recipe key method.merge_into). The report then also says how far the merged model's logits are from NF4 base +
adapter, and the held-out metric of the trained model, the merged one and the other choice, so the user sees what
merging cost. A full fine-tune has nothing to merge: its weights are copied and checked to load.

A LoRA adapter on a base larger than hf.models.LARGE_MODEL_BYTES (Phi-3-mini: 7.6 GB in bf16) is merged shard by shard in
the base's own dtype (merge_streaming): one shard in memory at a time, never an fp32 copy of the model. Its parity
check loads the first PARITY_LAYERS layers of the merged model and of base + adapter, one after the other, in fp32.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import yaml

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir
from toolchain.hf.models import config_dtype, is_large, load_causal_lm, load_tokenizer, user_prompt
from toolchain.config.sources import Resolved

TOLERANCE = 1e-3
# A large model's merge is checked on its first PARITY_LAYERS decoder layers, in fp32 (a few GB for Phi-3-mini):
# merged vs base + adapter. A bf16/fp16 merge rounds W + BA once to 16 bits, so there the logits may differ by that
# rounding, relative to the largest logit; on all 32 layers of a random-weight Phi-3-mini in bf16 arithmetic the two
# differed by 5.7e-2 with top-1 0.909 (random weights amplify rounding layer by layer). A weight name the base
# lacks is refused before this check.
PARITY_LAYERS = 2
HALF_TOLERANCE = 1e-2
HALF_MIN_TOP1 = 0.95
PROMPTS = [
    "Hi, this is Ada Lovelace. I'd like 2 tickets for the Paris show on 3 May, please.",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
]


def adapter_dir(path: Path) -> Path:
    """Accept a finetune output folder (with adapter/ or model/ inside) or the adapter folder itself."""
    path = Path(path)
    for p in (path / "adapter", path / "model", path):
        if (p / "adapter_config.json").is_file() or (p / "config.json").is_file():
            return p
    raise ToolchainError(f"{path}: no adapter_config.json here or in {path}/adapter; pass the folder `toolchain finetune` wrote")


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits.float()


def merge(src: Resolved, adapter: Path, out: Path, merge_into: Optional[str] = None,
          stream: Optional[bool] = None) -> dict:
    """Merge the adapter in `adapter` into the resolved base model; merge_into overrides the trained recipe's
    method.merge_into (QLoRA only). stream: shard by shard (default: for a plain LoRA adapter on a base larger than
    hf.models.LARGE_MODEL_BYTES)."""
    from peft import PeftModel

    adir = adapter_dir(adapter)
    if stream is None:
        stream = streamable(adir, merge_into) is None and is_large(src.path)
    if stream:
        return merge_streaming(src, adir, Path(out))
    trust_remote_code = src.trust_remote_code
    cfg = json.loads((src.path / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise ToolchainError(f"{src.path}/config.json: the base is quantized ({cfg['quantization_config'].get('quant_method')}); "
                             "merge into the full-precision base weights instead (a merge into a quantized base loses the adapter's precision)")
    tok = load_tokenizer(adir if (adir / "tokenizer_config.json").is_file() else src.path, trust_remote_code)
    texts = [user_prompt(tok, p) for p in PROMPTS]
    tok.padding_side = "right"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"].bool()
    rec = _trained_recipe(adir)
    qlora = rec is not None and rec.method.type == "qlora"
    if qlora and merge_into:
        rec.method.merge_into = merge_into
    if not (adir / "adapter_config.json").is_file():  # a full fine-tune: the weights are the model
        merged, before = load_causal_lm(adir, trust_remote_code), None
    else:
        peft_model = PeftModel.from_pretrained(_merge_base(src, rec, trust_remote_code) if qlora else
                                               load_causal_lm(src.path, trust_remote_code), adir)
        peft_model.eval()
        before = _logits(peft_model, batch)
        merged = peft_model.merge_and_unload()
    after = _logits(merged, batch)
    diff = float((before - after).abs()[mask].max()) if before is not None else 0.0
    report = {"model": src.card.name, "adapter": str(adir), "max_abs_logit_diff": diff, "tolerance": TOLERANCE,
              "prompts": len(PROMPTS), "passed": diff <= TOLERANCE}
    if qlora:
        report["qlora"] = qlora_merge_cost(src, adir, rec, tok, merged, batch, trust_remote_code)
    if diff > TOLERANCE:
        raise ToolchainError(f"merge parity failed: max |logit diff| {diff:.2e} > {TOLERANCE:.0e} between base+adapter "
                             f"and the merged model; nothing written to {out}")
    with atomic_dir(Path(out)) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report


def streamable(adir: Path, merge_into: Optional[str] = None) -> Optional[str]:
    """Why this adapter cannot be merged tensor by tensor (None: it can): W' = W + scale * B @ A per target. A QLoRA
    adapter can, into the full-precision base (method.merge_into: base, or `merge_into`)."""
    f = adir / "adapter_config.json"
    if not f.is_file():
        return "a full fine-tune has no adapter"
    cfg = json.loads(f.read_text())
    rec = _trained_recipe(adir)
    why = {"not LoRA": cfg.get("peft_type") != "LORA", "DoRA rescales each column": cfg.get("use_dora"),
           "QLoRA merged into its dequantized NF4 base": rec is not None and rec.method.type == "qlora" and
           (merge_into or rec.method.merge_into) != "base",
           "per-module ranks": cfg.get("rank_pattern") or cfg.get("alpha_pattern"),
           "modules_to_save": cfg.get("modules_to_save"), "fan_in_fan_out": cfg.get("fan_in_fan_out")}
    return next((k for k, v in why.items() if v), None)


def merge_streaming(src: Resolved, adir: Path, out: Path) -> dict:
    """W + scale * B @ A for each adapted weight, one base shard at a time, in the base's dtype (computed in fp32).
    A QLoRA adapter goes into the full-precision base; the in-memory merge's report of what that cost against the
    NF4 model it trained on (qlora_merge_cost) needs the model twice, so it is not made here."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    why = streamable(adir)
    if why:
        raise ToolchainError(f"{adir}: this adapter cannot be merged shard by shard ({why}); merge it in memory")
    cfg = json.loads((adir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    lora = load_file(str(adir / "adapter_model.safetensors"))
    pairs = {}
    for k, a in lora.items():
        if k.endswith(".lora_A.weight"):
            name = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
            pairs[name] = (a, lora[k.replace(".lora_A.", ".lora_B.")])
    shards = sorted(src.path.glob("*.safetensors"))
    tok = load_tokenizer(adir if (adir / "tokenizer_config.json").is_file() else src.path, src.trust_remote_code)
    dtypes = set()
    with atomic_dir(out) as tmp:
        for f in tqdm(shards, desc="merge, shard by shard"):
            tensors = {}
            with safe_open(str(f), "pt") as sf:
                meta = sf.metadata() or {"format": "pt"}
                for k in sf.keys():
                    t = sf.get_tensor(k)
                    if k in pairs:
                        a, b = pairs.pop(k)
                        t = (t.float() + scale * (b.float() @ a.float())).to(t.dtype)
                        dtypes.add(str(t.dtype).removeprefix("torch."))
                    tensors[k] = t
            save_file(tensors, str(tmp / f.name), metadata=meta)
            del tensors
        if pairs:
            raise ToolchainError(f"{adir}: {len(pairs)} adapted weights are not in the base at {src.path} (e.g. "
                                 f"{next(iter(pairs))}): the adapter was trained on another model")
        for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
            if (src.path / name).is_file():
                (tmp / name).write_bytes((src.path / name).read_bytes())
        tok.save_pretrained(tmp)
        report = {"model": src.card.name, "adapter": str(adir), "streamed": True, "shards": len(shards),
                  "dtype": sorted(dtypes), **_parity_one_at_a_time(src, adir, tmp, tok)}
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2))
        if not report["passed"]:
            raise ToolchainError(f"merge parity failed: max |logit diff| {report['max_abs_logit_diff']:.2e} "
                                 f"({report['relative_diff']:.1e} of the largest logit), top-1 agreement "
                                 f"{report['top1_agreement']:.3f}, between base+adapter and the merged model; nothing "
                                 f"written to {out}")
    return report


def _parity_one_at_a_time(src: Resolved, adir: Path, merged_dir: Path, tok) -> dict:
    """Logits of the merged model's first PARITY_LAYERS layers, then of base + adapter's, in fp32, each loaded and
    freed before the other: never two copies, never the whole model in fp32."""
    import gc

    from peft import PeftModel

    half = config_dtype(src.path) != torch.float32
    tok.padding_side = "right"
    batch = tok([user_prompt(tok, p) for p in PROMPTS], return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"].bool()
    m = load_causal_lm(merged_dir, src.trust_remote_code, layers=PARITY_LAYERS)
    after = _logits(m, batch)
    del m
    gc.collect()
    m = PeftModel.from_pretrained(load_causal_lm(src.path, src.trust_remote_code, layers=PARITY_LAYERS), adir).eval()
    before = _logits(m, batch)
    del m
    gc.collect()
    diff = float((before - after).abs()[mask].max())
    rel = diff / max(float(before.abs()[mask].max()), 1e-12)
    top1 = float((before.argmax(-1) == after.argmax(-1))[mask].float().mean())
    passed = (rel <= HALF_TOLERANCE and top1 >= HALF_MIN_TOP1) if half else diff <= TOLERANCE
    return {"max_abs_logit_diff": diff, "relative_diff": rel, "top1_agreement": top1, "prompts": len(PROMPTS),
            "checked": f"first {PARITY_LAYERS} decoder layers in float32",
            "tolerance": f"{HALF_TOLERANCE} of the largest logit, top-1 >= {HALF_MIN_TOP1}" if half else TOLERANCE,
            "passed": passed}


def _trained_recipe(adir: Path):
    """The resolved recipe `toolchain finetune` wrote beside the adapter, if any."""
    from toolchain.config.schema import Recipe

    f = adir.parent / "recipe.yaml"
    return Recipe.model_validate(yaml.safe_load(f.read_text())) if f.is_file() else None


def _merge_base(src, rec, trust_remote_code: bool):
    """The full-precision model a QLoRA adapter is merged into (recipe key method.merge_into): the fp32 base, or
    the NF4 weights it trained on dequantized to fp32. Never the 4-bit weights themselves."""
    if rec.method.merge_into == "base":
        return load_causal_lm(src.path, trust_remote_code)
    from toolchain.stages.finetune.methods import load_nf4

    return load_nf4(src.path, rec.method, trust_remote_code).dequantize().to(torch.float32).eval()


def qlora_merge_cost(src, adir: Path, rec, tok, merged, batch, trust_remote_code: bool) -> dict:
    """How far the merged model is from what was trained (NF4 base + adapter): logits on the parity prompts, and
    the recipe's held-out metric of the trained model, of the merged one and of the merge into the other base, so
    the user sees what merging cost and what method.merge_into would change."""
    from peft import PeftModel

    from toolchain.hf import data as data_mod
    from toolchain.hf.evaluate import score
    from toolchain.stages.finetune.methods import load_nf4

    nf4 = PeftModel.from_pretrained(load_nf4(src.path, rec.method, trust_remote_code), adir)
    nf4.eval()
    a, b = _logits(nf4, batch), _logits(merged, batch)
    mask = batch["attention_mask"].bool()
    ds = data_mod.load(rec, adir.parent / "recipe.yaml", tok)
    keep = ("perplexity", rec.metric.name)
    pick = lambda s: {k: s[k] for k in keep if k in s}  # noqa: E731
    other = rec.model_copy(deep=True)
    other.method.merge_into = "dequantized" if rec.method.merge_into == "base" else "base"
    alt = PeftModel.from_pretrained(_merge_base(src, other, trust_remote_code), adir).merge_and_unload().eval()
    names = {"base": "fp32 base", "dequantized": "NF4 base dequantized to fp32"}
    return {"merged_into": names[rec.method.merge_into] + " (method.merge_into: " + rec.method.merge_into + ")",
            "max_abs_logit_diff_vs_nf4_plus_adapter": float((a - b).abs()[mask].max()),
            "mean_abs_logit_diff_vs_nf4_plus_adapter": float((a - b).abs()[mask].mean()),
            "top1_agreement_vs_nf4_plus_adapter": float((a.argmax(-1) == b.argmax(-1))[mask].float().mean()),
            "nf4_plus_adapter": pick(score(nf4, tok, rec, ds, desc="NF4 base + adapter")),
            "merged": pick(score(merged, tok, rec, ds, desc="merged")),
            f"merged_into_{other.method.merge_into}": pick(score(alt, tok, rec, ds, desc=f"merged into {names[other.method.merge_into]}"))}
