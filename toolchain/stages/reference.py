"""Stage 3b: the held-out split as the device will see it, and the fp32 ONNX model's numbers on it.
reference_torch: the same from the merged torch model in its working dtype, for a model whose fp32 ONNX copy would
not fit (Phi-3-mini: 15 GB; hf.models.LARGE_MODEL_BYTES). reference_encoder: the same figures for an encoder artifact.

Writes eval.jsonl (token ids and loss mask per held-out example; for the first `eval_limit` a prompt, the reference
answer and the reference greedy tokens: the tuned torch model's, from the fine-tune stage, or the fp32 ONNX model's
when there are none, e.g. with an adapter), retention.jsonl (the general retention set, each prompt tokenized
under the generic system prompt) and reference.json (the fp32 ONNX model's perplexity; its task metric and
retention too when it generated the reference tokens). Every artifact ships both files, so a device validates on
exactly these tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from toolchain.hf import data as data_mod
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir
from toolchain.hf.models import load_tokenizer
from toolchain.runtime import genai, metrics
from toolchain.runtime.manifest import EVAL_FILE
from toolchain.config.catalog import RETENTION_SET
from toolchain.hf.retention import prompt as general_prompt
from toolchain.hf.retention import read_items
from toolchain.runtime.retention import RETENTION_FILE
from toolchain.runtime.validate import accuracy, retention
from toolchain.runtime import encoder as rt_encoder


def _rows(tok, recipe, recipe_file: Path) -> list[dict]:
    """eval.jsonl's rows: token ids and loss mask per held-out example, a prompt and reference for the first
    eval_limit."""
    ds = data_mod.load(recipe, recipe_file, tok)
    rows = []
    for i, (ex, row) in enumerate(zip(ds.eval, ds.eval_rows)):
        r = {"input_ids": ex["input_ids"], "labels": ex["labels"]}
        pair = data_mod.generation_pair(row, tok)
        if pair and i < recipe.metric.eval_limit:
            r.update(prompt_ids=tok(pair[0], add_special_tokens=False)["input_ids"], reference=pair[1])
            if recipe.metric.name == "constraint_rate":  # the device checks outputs against these, not the reference
                r["constraints"] = metrics.parse_constraints(pair[0])
        rows.append(r)
    return rows


def _general(tok) -> list[dict]:
    """retention.jsonl's rows: the general set, each prompt tokenized under the generic system prompt."""
    return [{**it, "prompt_ids": tok(general_prompt(tok, it["prompt"]), add_special_tokens=False)["input_ids"]}
            for it in read_items(RETENTION_SET)]


def _write(out: Path, rows: list[dict], figures: dict, general: list[dict] = ()) -> None:
    with atomic_dir(Path(out)) as tmp:
        (tmp / EVAL_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if general:
            (tmp / RETENTION_FILE).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in general))
        (tmp / "reference.json").write_text(json.dumps(figures, indent=2))


def reference(export_dir: Path, merged_dir: Path, recipe, recipe_file: Path, out: Path,
              adapter: Optional[Path] = None, greedy: Optional[Path] = None) -> dict:
    """adapter: an .onnx_adapter file the fp32 model runs with (a multi-adapter base: stages/adapters.py).
    greedy: the fine-tune stage's greedy_tokens.json, the tuned torch model's answers to the same prompts: they are
    then the reference tokens, and the fp32 ONNX model scores perplexity only (reference_tokens())."""
    tok = load_tokenizer(merged_dir)
    rows = _rows(tok, recipe, recipe_file)
    model, og_tok = genai.load(Path(export_dir), adapter=adapter)
    gen = [r for r in rows if "prompt_ids" in r]
    if greedy is not None and Path(greedy).is_file() and recipe.metric.name in metrics.GENERATIVE:
        figures = reference_tokens(model, rows, gen, json.loads(Path(greedy).read_text()))
        _write(out, rows, figures, _general(tok))
        return figures
    with tqdm(total=sum("prompt_ids" in r for r in rows), desc="fp32 ONNX reference generations") as bar:
        figures, generated = accuracy(model, og_tok, rows, recipe.metric.name, recipe.metric.max_new_tokens,
                                      progress=lambda i, n: bar.update(1))
    for r, toks in zip([r for r in rows if "prompt_ids" in r], generated):
        r["fp32_tokens"] = toks
    general = _general(tok)  # with an adapter: what the base with it still knows
    if general:
        figures.update(retention(model, og_tok, general))
    _write(out, rows, figures, general)
    return figures


def reference_tokens(model, rows: list[dict], gen: list[dict], tokens: list[list[int]]) -> dict:
    """The fp32 ONNX model's held-out perplexity, and the tuned torch model's greedy tokens as each generated row's
    reference (eval.jsonl's fp32_tokens). The export stage has checked the fp32 ONNX logits against torch's
    (export parity), and its greedy answers were torch's: the same exact match (0.781 on the AVX2 EPYC, 0.891 on
    the AVX512 one). Generating them again cost 64 fp32 decodes plus 48 retention answers, 95 of the 108 s this
    stage took on a 2-core AVX2 EPYC; the torch task metric and retention stand in the manifest's torch_tuned."""
    if len(tokens) != len(gen):
        raise ToolchainError(f"the fine-tune stage's greedy tokens cover {len(tokens)} answers, the held-out split "
                             f"has {len(gen)} prompts: run with --force")
    nll, n = 0.0, 0
    for r in rows:
        a, b = genai.nll(model, r["input_ids"], r["labels"])
        nll, n = nll + a, n + b
    for r, toks in zip(gen, tokens):
        r["fp32_tokens"] = toks
    return {"perplexity": metrics.perplexity(nll, n), "eval_tokens": n, "eval_examples": len(gen),
            "source": "fp32 ONNX perplexity; reference tokens: the tuned torch model's greedy answers"}


def reference_torch(merged_dir: Path, recipe, recipe_file: Path, out: Path) -> dict:
    """The reference figures from the merged torch model in its working dtype (bf16 for Phi-3-mini), scored by the
    device's metric code; its greedy tokens stand where the fp32 ONNX model's would (eval.jsonl's fp32_tokens, the
    min_token_agreement_fp32 gate). reference.json names the model it came from."""
    import torch

    from toolchain.hf.evaluate import heldout_nll
    from toolchain.hf.models import load_causal_lm, working_dtype

    tok = load_tokenizer(merged_dir)
    rows = _rows(tok, recipe, recipe_file)
    dtype = working_dtype(merged_dir)
    model = load_causal_lm(Path(merged_dir), dtype=dtype)
    nll, n = heldout_nll(model, [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows], tok.pad_token_id)
    figures = {"perplexity": metrics.perplexity(nll, n), "eval_tokens": n,
               "source": f"torch {str(dtype).removeprefix('torch.')} (merged model): its fp32 ONNX copy would not fit"}
    gen = [r for r in rows if "prompt_ids" in r]
    if gen and recipe.metric.name in metrics.GENERATIVE:
        eos = [model.generation_config.eos_token_id, tok.eos_token_id]
        eos = [e for x in eos for e in (x if isinstance(x, list) else [x]) if e is not None]
        preds = []
        with torch.no_grad():
            for r in tqdm(gen, desc=f"torch reference generations ({figures['source'].split(' (')[0]})"):
                ids = torch.tensor([r["prompt_ids"]])
                toks = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=recipe.metric.max_new_tokens, eos_token_id=eos,
                                      pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
                r["fp32_tokens"] = toks
                preds.append(tok.decode(toks, skip_special_tokens=True))
        figures.update(metrics.task_scores(recipe.metric.name, preds, [r["reference"] for r in gen],
                                           [r.get("constraints", {}) for r in gen]))
        figures["eval_examples"] = len(gen)
    # the retention set ships for the device to score; the torch model's own retention is the fine-tune stage's
    _write(out, rows, figures, _general(tok))
    return figures


def reference_encoder(export_dir: Path, model_dir: Path, recipe, held: list[dict], labels: list[str], out: Path) -> dict:
    """An encoder's fp32 ONNX figures on the held-out rows, scored by the device's code (runtime/encoder.py)."""
    tok = rt_encoder.load_tokenizer(Path(model_dir) / rt_encoder.TOKENIZER, recipe.data.max_length)
    figs = rt_encoder.score(rt_encoder.ort_forward(Path(export_dir) / rt_encoder.MODEL), tok, held, recipe.task,
                            recipe.metric.name, labels)
    with atomic_dir(Path(out)) as tmp:
        (tmp / "reference.json").write_text(json.dumps(figs, indent=2))
    return figs
