"""Multi-adapter artifacts on a device: one base loaded once, LoRA adapters switched between requests. No torch.

    <model>-adapters/<target>/
        model.onnx, model.onnx.data, genai_config.json, tokenizer   the base, with LoRA inputs whose empty defaults
                                                                     make it the plain base when no adapter is active
        adapters/<name>.onnx_adapter    ONNX Runtime's adapter format (onnxruntime.AdapterFormat), one per recipe
        adapters/<name>.eval.jsonl      that recipe's held-out split, tokenized, with the fp32 ONNX tokens of the
                                        base with that adapter
        manifest.json                   every file's sha256; `base` (the base weights' hash, target modules, LoRA
                                        inputs); `adapters` (per name: recipe, rank, sha256, the base weights it was
                                        trained on, reference figures: torch base / tuned, fp32 ONNX with it)

    model, tok, man = adapters.open_artifact(folder)      # every file checked, the base loaded once
    genai.generate(model.use("chat-lora"), ids, 40)       # switching loads nothing: the next generator runs with it
    genai.generate(model.use(None), ids, 40)              # the base alone

An adapter is refused when its file's sha256 differs from the manifest or when it was trained on other base weights
than the artifact's.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np

from toolchain.runtime import genai, host, manifest, retention as rt_retention
from toolchain.runtime.contracts import Report
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import sha256_file
from toolchain.runtime.gates import check_gates, merge_gates
from toolchain.runtime.memory import peak_rss_mb
from toolchain.runtime.validate import accuracy, latency, pick_provider, retention


def adapter_path(name: str) -> str:
    """Where adapter `name` lies in an artifact (relative, as the manifest lists it)."""
    return f"{genai.ADAPTERS_DIR}/{name}{genai.ADAPTER_SUFFIX}"


def eval_path(name: str) -> str:
    return f"{genai.ADAPTERS_DIR}/{name}.eval.jsonl"


def entries(man: dict, folder: Path) -> dict[str, dict]:
    if not man.get("adapters"):
        raise ToolchainError(f"{folder}: not a multi-adapter artifact (its manifest lists no adapters); build one with "
                             "`toolchain edge --adapters RECIPE,RECIPE`")
    return man["adapters"]


def check_entry(folder: Path, man: dict, name: str) -> dict:
    """The manifest entry of adapter `name`, after checking it was trained on this artifact's base weights and its
    file still has the sha256 it was packaged with."""
    ads = entries(man, folder)
    if name not in ads:
        raise ToolchainError(f"{folder}: no adapter '{name}'; this artifact has {', '.join(sorted(ads))}")
    e = ads[name]
    base = man.get("base", {}).get("weights")
    if not base or e.get("base_weights") != base:
        raise ToolchainError(f"{folder / e['file']}: adapter '{name}' was trained on other base weights "
                             f"({e.get('base_weights')}) than this artifact's base ({base}); it would run, and compute "
                             "nonsense. Train it on this base (`toolchain adapters add`)")
    f = Path(folder) / e["file"]
    if not f.is_file():
        raise ToolchainError(f"{f}: adapter '{name}' is listed in the manifest but missing; copy the artifact again")
    if sha256_file(f) != e["sha256"] or man["files"].get(e["file"]) != e["sha256"]:
        raise ToolchainError(f"{f}: sha256 differs from the manifest (file changed or corrupted); copy the artifact "
                             "again or rebuild the adapter")
    return e


def open_artifact(folder: Path, provider: str = "cpu", options: Optional[dict] = None,
                  names: Optional[list[str]] = None) -> tuple[genai.Adapted, object, dict, dict]:
    """(model, tokenizer, manifest, load_ms): every file of the artifact checked against the manifest, the base
    loaded once and each adapter (all, or `names`) loaded into it. model.use(name) picks the adapter."""
    folder = Path(folder)
    man = manifest.verify(folder)
    ads = entries(man, folder)
    names = list(ads) if names is None else names
    files = checked_files(folder, man, names)  # before the base is loaded
    base, tok = genai.load(folder, provider, options)
    model, load_ms = load_into(base, files)
    return model, tok, man, load_ms


def checked_files(folder: Path, man: dict, names: list[str]) -> dict[str, Path]:
    """name -> the adapter file, for each of `names` after check_entry."""
    return {n: Path(folder) / check_entry(folder, man, n)["file"] for n in names}


def load_into(base, files: dict[str, Path]) -> tuple[genai.Adapted, dict]:
    """(model, load_ms): the adapter files (checked_files) loaded into the og.Model `base`."""
    import onnxruntime_genai as og

    model, load_ms = genai.Adapted(base, og.Adapters(base)), {}
    for n, f in files.items():
        t0 = time.perf_counter()
        model = model.load(n, f)
        load_ms[n] = 1000 * (time.perf_counter() - t0)
    return model, load_ms


def switch_times(model: genai.Adapted, prompt_ids: list[int], rounds: int = 5) -> dict:
    """Time to switch: requests alternate over the base and every loaded adapter, each followed by a request with
    the same adapter again. activate: a new generator with its adapter set active; first token: that plus the
    prompt's prefill and one greedy token."""
    import onnxruntime_genai as og

    def once(handle) -> tuple[float, float]:
        params = og.GeneratorParams(model.model)
        params.set_search_options(do_sample=False, max_length=len(prompt_ids) + 1)
        t0 = time.perf_counter()
        gen = genai.new_generator(handle, params)
        t1 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        gen.generate_next_token()
        return 1000 * (t1 - t0), 1000 * (time.perf_counter() - t0)

    order = [None, *sorted(model.loaded)]
    for n in order:
        once(model.use(n))  # warm-up
    switched, same = [], []
    for _ in range(rounds):
        for n in order:
            switched.append(once(model.use(n)))  # another adapter than the request before
            same.append(once(model.use(n)))  # the same again
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    return {"requests": len(switched) + len(same), "adapters": len(order) - 1, "prompt_tokens": len(prompt_ids),
            "activate_ms_switched_p50": med(switched, 0), "activate_ms_same_p50": med(same, 0),
            "first_token_ms_switched_p50": med(switched, 1), "first_token_ms_same_p50": med(same, 1)}


def _rows(folder: Path, entry: dict) -> list[dict]:
    return [json.loads(x) for x in (folder / entry["eval"]).read_text().splitlines() if x.strip()]


def _mb(folder: Path, names) -> float:
    return sum((folder / n).stat().st_size for n in names) / 1e6


def validate(folder: Path, adapter: Optional[str] = None, progress=None, lookup: int = 0) -> dict:
    """Every adapter (or only `adapter`) against its own recipe's gates and reference figures, on its own held-out
    split; the base alone on each of those splits beside the untuned torch base; and the time to switch."""
    folder = Path(folder)
    man = manifest.verify(folder)
    ads = entries(man, folder)
    names = [adapter] if adapter else sorted(ads)
    target = man["target"]
    base_mb = _mb(folder, [f for f in man["files"] if "/" not in f and f.startswith("model.onnx")])
    sizes = {"size_mb": base_mb + _mb(folder, [ads[n]["file"] for n in ads]), "base_mb": base_mb,
             "adapters_mb": {n: _mb(folder, [ads[n]["file"]]) for n in ads}}
    out = {"artifact": str(folder), "target": target["name"], "ep": target.get("ep", "CPUExecutionProvider"),
           "precision": target.get("precision"), "host": host.describe()}
    provider, note = pick_provider(target)
    if provider is None:
        for n in names:
            check_entry(folder, man, n)
        return Report(**out, validated=False, status="not_validated", reason=note, measured=sizes, passed=False).out()
    t0 = time.time()
    model, tok, man, load_ms = open_artifact(folder, provider, target.get("provider_options") if provider != "cpu" else None,
                                             names)
    eos = genai.eos_ids(tok)
    general = rt_retention.read(folder)  # scored with each adapter (its min_retention gate) and with the base alone
    base_retention = retention(model.use(None), tok, general) if general else {}
    reports, base = {}, {}
    for n in names:
        e, rows = ads[n], _rows(folder, ads[n])
        rec, metric = e["recipe"], e["recipe"]["metric"]["name"]
        prompt = rows[0].get("prompt_ids") or rows[0]["input_ids"]
        m = model.use(n)
        lat = latency(m, prompt, lookup=lookup, eos=eos)
        acc, _ = accuracy(m, tok, rows, metric, rec["metric"]["max_new_tokens"], progress, lookup)
        if general:
            acc.update(retention(m, tok, general))
        measured = {**lat, **acc, "adapter_mb": sizes["adapters_mb"][n], "load_ms": load_ms[n]}
        gates = check_gates(merge_gates(rec.get("gates", {}), target.get("gates", {})), measured, e["reference"], metric)
        passed = all(g["passed"] for g in gates)
        reports[n] = {"recipe": rec["name"], "metric": metric, "status": "passed" if passed else "gates_missed",
                      "passed": passed, "measured": measured, "gates": gates, "reference": e["reference"],
                      "rank": e.get("rank")}
        figs, _ = accuracy(model.use(None), tok, rows, metric, rec["metric"]["max_new_tokens"], progress)
        figs.pop("token_agreement_fp32", None)  # the split's fp32 tokens are the adapter's, not the base's
        torch_base = e["reference"].get("torch_base", {})
        figs.update(base_retention)
        figs["torch_base"] = {k: torch_base[k] for k in (metric, "perplexity", "retention") if k in torch_base}
        if "perplexity" in torch_base:
            figs["delta_perplexity_vs_torch_base_pct"] = 100 * (figs["perplexity"] / torch_base["perplexity"] - 1)
        base[n] = figs
    sw = switch_times(model, _rows(folder, ads[names[0]])[0].get("prompt_ids") or _rows(folder, ads[names[0]])[0]["input_ids"])
    passed = all(r["passed"] for r in reports.values())
    measured = {**sizes, "peak_rss_mb": peak_rss_mb(), "load_ms": load_ms}
    return Report(**out, provider=provider, validated=True, status="passed" if passed else "gates_missed",
                  passed=passed, measured=measured, adapters=reports, base=base, switch=sw,
                  seconds=round(time.time() - t0, 1), note=note,
                  decoding=f"greedy with prompt lookup (drafts of up to {lookup} tokens)" if lookup > 0 else None).out()
