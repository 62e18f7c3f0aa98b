"""Encoder artifacts (classification, NER) on a device: ONNX Runtime plus the `tokenizers` package. No torch.

An encoder artifact is a plain folder, no GenAI config:

    model.onnx        the Optimum export (text-classification or token-classification), quantized or not
    tokenizer.json    the fast tokenizer, read by `tokenizers`
    eval.jsonl        the held-out rows as written in the recipe's data ({"text","label"} or {"tokens","tags"})
    manifest.json     labels, max_length, recipe, reference figures (torch base/tuned, fp32 ONNX), sha256 of files

Tokenizing and decoding live here and nowhere else: the torch side (toolchain/stages/*/encoder.py) calls the same
`encode` and `decode` around its own forward pass, so torch and ONNX Runtime are scored on identical inputs.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime import host, jsonl, metrics
from toolchain.runtime.contracts import Report
from toolchain.runtime.gates import check_gates, status
from toolchain.runtime.manifest import EVAL_FILE
from toolchain.runtime.memory import peak_rss_mb

TOKENIZER = "tokenizer.json"
MODEL = "model.onnx"


def read_rows(path: Path, task: str) -> list[dict]:
    """Classification rows {"text": str, "label": str} or NER rows {"tokens": [str], "tags": [str]} (same length);
    the first bad line fails with `file:line: what is wrong`."""
    want = ("text", "label") if task == "classify" else ("tokens", "tags")
    rows = []
    for n, obj in jsonl.objects(path):
        if not isinstance(obj, dict) or set(obj) != set(want):
            raise ToolchainError(f"{path}:{n}: a {task} row needs exactly the keys {list(want)}")
        if task == "classify":
            if not (isinstance(obj["text"], str) and isinstance(obj["label"], str) and obj["text"].strip()):
                raise ToolchainError(f"{path}:{n}: 'text' and 'label' must be non-empty strings")
        elif not (isinstance(obj["tokens"], list) and isinstance(obj["tags"], list) and obj["tokens"]
                  and len(obj["tokens"]) == len(obj["tags"])):
            raise ToolchainError(f"{path}:{n}: 'tokens' and 'tags' must be non-empty lists of the same length")
        rows.append(obj)
    if not rows:
        raise ToolchainError(f"{path}: no rows")
    return rows


def load_tokenizer(path: Path, max_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length)
    return tok


def encode(tok, rows: list[dict], task: str) -> dict:
    """A padded batch: input_ids, attention_mask, token_type_ids (int64) and, for NER, each token's word index."""
    if task == "classify":
        encs = tok.encode_batch([r["text"] for r in rows])
    else:
        encs = tok.encode_batch([r["tokens"] for r in rows], is_pretokenized=True)
    n = max(len(e.ids) for e in encs)
    batch = {k: np.zeros((len(encs), n), dtype=np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    words = []
    for i, e in enumerate(encs):
        k = len(e.ids)
        batch["input_ids"][i, :k], batch["attention_mask"][i, :k], batch["token_type_ids"][i, :k] = (
            e.ids, e.attention_mask, e.type_ids)
        words.append(e.word_ids)
    return {**batch, "word_ids": words}


def token_labels(batch: dict, rows: list[dict], label_ids: dict[str, int], ignore: int = -100) -> np.ndarray:
    """NER training targets: each word's tag on its first sub-token, `ignore` elsewhere."""
    out = np.full(batch["input_ids"].shape, ignore, dtype=np.int64)
    for i, (wids, row) in enumerate(zip(batch["word_ids"], rows)):
        prev = None
        for j, w in enumerate(wids):
            if w is not None and w != prev:
                out[i, j] = label_ids[row["tags"][w]]
            prev = w
    return out


def decode(logits: np.ndarray, batch: dict, rows: list[dict], task: str, labels: list[str]) -> list:
    """Predicted label per row, or predicted tag per word (first sub-token; words cut by truncation get 'O')."""
    best = np.asarray(logits).argmax(-1)
    if task == "classify":
        return [labels[int(b)] for b in best]
    out = []
    for i, (wids, row) in enumerate(zip(batch["word_ids"], rows)):
        tags, prev = ["O"] * len(row["tokens"]), None
        for j, w in enumerate(wids):
            if w is not None and w != prev:
                tags[w] = labels[int(best[i, j])]
            prev = w
        out.append(tags)
    return out


def references(rows: list[dict], task: str) -> list:
    return [r["label"] for r in rows] if task == "classify" else [r["tags"] for r in rows]


def predict(forward: Callable[[dict], np.ndarray], tok, rows: list[dict], task: str, labels: list[str],
            batch_size: int = 32) -> list:
    """Predictions for every row, `forward` mapping a batch (numpy) to logits: torch or ONNX Runtime."""
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        b = encode(tok, chunk, task)
        out += decode(forward(b), b, chunk, task, labels)
    return out


def score(forward, tok, rows: list[dict], task: str, metric: str, labels: list[str], batch_size: int = 32) -> dict:
    preds = predict(forward, tok, rows, task, labels, batch_size)
    return {**metrics.task_scores(metric, preds, references(rows, task)), "eval_examples": len(rows)}


def ort_forward(model_path: Path, threads: int = 0) -> Callable[[dict], np.ndarray]:
    """An ONNX Runtime CPU session wrapped as forward(batch) -> logits."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda b: sess.run(None, {k: b[k] for k in names})[0]


def latency(forward, tok, rows: list[dict], task: str, runs: int = 3) -> dict:
    """One sequence at a time, tokenizer included: p50/p95 over `runs` passes of up to 32 rows, after a warm-up."""
    sample = rows[:32]
    forward(encode(tok, sample[:1], task))
    times = []
    for _ in range(runs):
        for r in sample:
            t0 = time.perf_counter()
            forward(encode(tok, [r], task))
            times.append(1000 * (time.perf_counter() - t0))
    q = statistics.quantiles(times, n=20, method="inclusive")
    return {"latency_ms_p50": statistics.median(times), "latency_ms_p95": q[18], "latency_runs": len(times),
            "sequences_per_s": 1000 / statistics.median(times)}


def int8_host_note(h: dict, quant: dict) -> Optional[str]:
    """The report's note when this x86 CPU has no VNNI and the artifact has dynamic int8 matmuls: there ONNX
    Runtime's u8s8 kernel (AVX2, or AVX512 without VNNI) sums pairs of products in int16, which full-range int8
    weights can saturate (stages/quantize/dynamic.py has the figures). None when that does not apply."""
    x86 = h.get("machine", "").lower() in ("x86_64", "amd64")
    if quant.get("method") != "quantize_dynamic" or h.get("vnni") or not x86:
        return None
    cpu = f"this CPU has no VNNI ({' '.join(h.get('isa', [])) or 'no AVX2'})"
    if quant.get("weight_type") == "int8" and not quant.get("reduce_range"):
        return (f"{cpu}: ONNX Runtime's int8 matmuls sum pairs in int16 here, which this artifact's full-range int8 "
                "weights can saturate, so its figures may fall below the build host's; rebuild it with this "
                "toolchain (7-bit weights, reduce_range)")
    return f"{cpu}: ONNX Runtime's int8 matmuls sum pairs in int16 here; the artifact's 7-bit weights keep them exact"


def validate(folder: Path, man: dict, data: Optional[Path] = None, progress=None) -> dict:
    """Integrity was checked by the caller (manifest.verify). Latency, then the task metric on the shipped eval
    split (or `data`), then the recipe's gates against the torch tuned figures."""
    folder = Path(folder)
    rec, enc = man["recipe"], man["encoder"]
    task, metric = enc["task"], rec["metric"]["name"]
    tok = load_tokenizer(folder / TOKENIZER, enc["max_length"])
    rows = read_rows(Path(data) if data else folder / EVAL_FILE, task)
    forward = ort_forward(folder / MODEL)
    t0 = time.time()
    measured = latency(forward, tok, rows, task)
    measured.update(score(forward, tok, rows, task, metric, enc["labels"]))
    measured["size_mb"] = (folder / MODEL).stat().st_size / 1e6
    measured["peak_rss_mb"] = peak_rss_mb()
    reference = man.get("reference", {})
    gates = check_gates(rec.get("gates", {}), measured, reference, metric) if data is None else []
    target, passed = man["target"], all(g["passed"] for g in gates) if data is None else None
    here = host.describe()
    return Report(artifact=str(folder), target=target["name"], provider="cpu", kind="encoder", metric=metric,
                  note=int8_host_note(here, target.get("quantize") or {}),
                  status=status(passed), figures=metrics.FAMILIES[metric], validated=True,
                  data=str(data) if data else EVAL_FILE, measured=measured, reference=reference, gates=gates,
                  passed=passed, seconds=round(time.time() - t0, 1), host=here).out()
