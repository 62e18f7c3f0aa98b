"""Validate a GGUF artifact (gguf-q8_0, gguf-q4_k_m) with llama.cpp, through llama-cpp-python. No torch; llama_cpp
is imported only here, and only when validating. validate.validate sends a GGUF manifest here after checking every
file's sha256.

1. Where llama-cpp-python is not installed: status not_validated, reason NOT_INSTALLED (the CLI exits 3), never a
   pass.
2. The GGUF's own tokenizer (llama.cpp's, written by its converter) must give the shipped token ids: the first
   CHECK_ROWS rows of eval.jsonl are detokenized and tokenized again by llama.cpp and must come back unchanged, or
   validation refuses (the figures would be scored on other tokens than the references).
3. Accuracy on the shipped eval.jsonl ids, as validate.py measures the ONNX artifacts: perplexity on the
   loss-carrying tokens (every position's logits, one pass per row), the recipe's task metric by greedy generation
   from prompt_ids (stopping at llama.cpp's end-of-generation tokens), greedy token agreement with the fp32 ONNX
   model.
4. Latency: a warm-up, then repeated greedy runs of a fixed number of new tokens on the first held-out prompt: TTFT
   p50/p95, prefill tok/s, decode tok/s p50; peak RSS, size on disk. Generation runs in a context that keeps the
   last position's logits only (as llama.cpp runs for a user); scoring in one that keeps every position's.
5. The recipe's gates (gates.check_gates), against the reference figures the pipeline recorded.
With --data the user's JSONL is tokenized by the GGUF's own tokenizer and chat template (devicedata.tokenize_rows,
as for the ONNX artifacts) and scored the same way, without gates.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from toolchain.runtime import host, metrics, retention as rt_retention
from toolchain.runtime.contracts import Report
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.gates import check_gates, merge_gates
from toolchain.runtime.manifest import EVAL_FILE
from toolchain.runtime.memory import peak_rss_mb

NOT_INSTALLED = "built, not validated on this host: llama-cpp-python not installed"
CHECK_ROWS = 8  # rows whose ids llama.cpp's tokenizer must reproduce
LATENCY_TOKENS, LATENCY_RUNS = 64, 5  # what validate.latency times for the ONNX artifacts


def llama_cpp_version() -> Optional[str]:
    """llama-cpp-python's version where it imports here, else None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def model_file(folder: Path, man: dict) -> Path:
    """The artifact's one .gguf file (listed, and so hashed, in the manifest)."""
    names = [n for n in man.get("files", {}) if n.endswith(".gguf")]
    if len(names) != 1:
        raise ToolchainError(f"{Path(folder) / 'manifest.json'}: a GGUF artifact lists one .gguf file, found "
                             f"{len(names)}; rebuild it with `toolchain edge --target {man['target']['name']}`")
    return Path(folder) / names[0]


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, 100 * q))  # linear interpolation, as validate.py's


def agreement(pred: list[int], ref: list[int]) -> float:
    """Fraction of reference positions where the greedy token is the same (positions past the end count as misses)."""
    return sum(a == b for a, b in zip(pred, ref)) / len(ref) if ref else 1.0


def check_tokenizer(detokenize: Callable[[list[int]], bytes], tokenize: Callable[[bytes], list[int]],
                    rows: list[dict], n: int = CHECK_ROWS) -> int:
    """Refuse (ToolchainError) unless llama.cpp's tokenizer gives back the shipped ids of the first `n` rows
    (input_ids and prompt_ids) from their text; returns how many sequences were checked."""
    checked = 0
    for i, r in enumerate(rows[:n]):
        for key in ("input_ids", "prompt_ids"):
            ids = [int(x) for x in r.get(key) or []]
            if not ids:
                continue
            again = [int(x) for x in tokenize(detokenize(ids))]
            if again != ids:
                k = next((j for j, (a, b) in enumerate(zip(ids, again)) if a != b), min(len(ids), len(again)))
                raise ToolchainError(
                    f"{EVAL_FILE} row {i + 1}: the GGUF's tokenizer (llama.cpp) does not give the shipped token ids "
                    f"({key}, first difference at position {k}: shipped {ids[k:k + 4]}, llama.cpp {again[k:k + 4]}), "
                    "so its perplexity and answers would be scored on other tokens than the reference's. llama.cpp's "
                    "converter did not reproduce this tokenizer (see the manifest's target.quantize.pre_tokenizer); "
                    "validate one of the ONNX targets instead")
            checked += 1
    return checked


def row_nll(logits: np.ndarray, labels: list[int]) -> tuple[float, int]:
    """Sum of next-token negative log-likelihood over positions whose label is not -100, and their count."""
    lab = np.asarray(labels[1:])
    keep = lab != -100
    logp = metrics.log_softmax(np.asarray(logits[:-1], dtype=np.float32)[keep])
    return float(-logp[np.arange(len(logp)), lab[keep]].sum()), int(keep.sum())


class Runner:
    """One GGUF in llama.cpp: greedy generation with timings, and every position's logits for scoring."""

    def __init__(self, path: Path, threads: int, n_ctx: int, logits_all: bool = False):
        from llama_cpp import Llama

        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(512, n_ctx), n_threads=threads,
                             n_threads_batch=threads, logits_all=logits_all, verbose=False)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise ToolchainError(f"{path}: llama.cpp (llama-cpp-python {llama_cpp_version()}) could not load it ({e}); "
                                 "it was converted by the llama.cpp of the manifest's target.exporter: install that "
                                 "llama-cpp-python version") from None

    def close(self) -> None:
        self.llm.close()

    def detokenize(self, ids: list[int]) -> bytes:
        return self.llm.detokenize(ids, special=True)

    def tokenize(self, text: bytes) -> list[int]:
        return self.llm.tokenize(text, add_bos=False, special=True)

    def is_eog(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self.llm.model), token))

    def text(self, tokens: list[int]) -> str:
        """The answer as text: end-of-generation tokens dropped, special tokens not rendered."""
        return self.llm.detokenize([t for t in tokens if not self.is_eog(t)]).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        """As onnxruntime-genai's Tokenizer.encode: a BOS only where the GGUF's tokenizer says to add one."""
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def apply_chat_template(self, messages: str, add_generation_prompt: bool) -> str:
        """The GGUF's own chat template (tokenizer.chat_template), rendered as llama-cpp-python renders it; the
        messages as a JSON string, as onnxruntime-genai's Tokenizer takes them (devicedata.tokenize_rows)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ToolchainError("this GGUF has no chat template (tokenizer.chat_template): chat rows in --data "
                                 "cannot be formatted; use prompt/completion or text rows")
        piece = lambda t: self.llm.detokenize([t], special=True).decode("utf-8", errors="replace")  # noqa: E731
        fmt = Jinja2ChatFormatter(template, eos_token=piece(self.llm.token_eos()), bos_token=piece(self.llm.token_bos()),
                                  add_generation_prompt=add_generation_prompt)
        return fmt(messages=json.loads(messages)).prompt

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return self.llm.scores[: len(ids)]

    def generate(self, prompt_ids: list[int], max_new: int, force_length: bool = False) -> dict:
        """Greedy decoding (llama.cpp's greedy sampler) from a fresh context: no prompt cache between calls.
        force_length keeps going past end-of-generation, for timing a fixed number of tokens."""
        self.llm.reset()
        out, t_first = [], None
        t0 = time.perf_counter()
        for tok in self.llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if t_first is None:
                t_first = time.perf_counter()
            if len(out) >= max_new or (not force_length and self.is_eog(tok)):
                break
        end = time.perf_counter()
        return {"tokens": out, "ttft_s": (t_first or end) - t0, "decode_s": end - (t_first or end)}


def _decode_tok_s(g: dict) -> float:
    n = len(g["tokens"]) - 1
    return n / g["decode_s"] if n > 0 and g["decode_s"] > 0 else float("nan")


def latency(run: Runner, prompt_ids: list[int], new_tokens: int = LATENCY_TOKENS, runs: int = LATENCY_RUNS) -> dict:
    run.generate(prompt_ids, new_tokens, force_length=True)  # warm-up
    gens = [run.generate(prompt_ids, new_tokens, force_length=True) for _ in range(runs)]
    ttft = [g["ttft_s"] for g in gens]
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "runs": runs,
            "ttft_ms_p50": 1000 * _percentile(ttft, 0.5), "ttft_ms_p95": 1000 * _percentile(ttft, 0.95),
            "prefill_tok_s": len(prompt_ids) / _percentile(ttft, 0.5),
            "decode_tok_s_p50": statistics.median(_decode_tok_s(g) for g in gens)}


def answers(run: Runner, rows: list[dict], metric: str, max_new_tokens: int, progress=None) -> dict:
    """The recipe's metric by greedy generation on the rows with a prompt, token agreement with the fp32 ONNX
    model's greedy tokens, and the decode speed over those answers."""
    gen_rows = [r for r in rows if "prompt_ids" in r]
    if not gen_rows or metric not in metrics.GENERATIVE:
        return {}
    preds, agree, decoded, decode_s = [], [], 0, 0.0
    for i, r in enumerate(gen_rows):
        g = run.generate(r["prompt_ids"], max_new_tokens)
        preds.append(run.text(g["tokens"]))
        decoded, decode_s = decoded + len(g["tokens"]) - 1, decode_s + g["decode_s"]
        if "fp32_tokens" in r:
            agree.append(agreement(g["tokens"], r["fp32_tokens"]))
        if progress:
            progress(i + 1, len(gen_rows))
    out = metrics.task_scores(metric, preds, [r["reference"] for r in gen_rows],
                              [r.get("constraints", {}) for r in gen_rows])
    out.update(eval_examples=len(gen_rows), answers_decode_tok_s=decoded / decode_s if decode_s else float("nan"))
    if agree:
        out["token_agreement_fp32"] = sum(agree) / len(agree)
    return out


def validate(folder: Path, man: dict, data: Optional[Path] = None, progress=None, lookup: int = 0) -> dict:
    """The report for a GGUF artifact whose files validate.validate has already checked against the manifest."""
    folder = Path(folder)
    if lookup:
        raise ToolchainError(f"{folder}: --lookup (prompt-lookup decoding) runs on onnxruntime-genai artifacts; "
                             "validate this GGUF without it")
    target, rec = man["target"], man["recipe"]
    metric = rec["metric"]["name"]
    gguf = model_file(folder, man)
    threads = host.describe()["cores"]
    base = {"artifact": str(folder), "target": target["name"], "ep": target.get("ep", "llama.cpp"),
            "precision": target.get("precision"), "reference": man.get("reference", {}), "host": host.describe(threads),
            "metric": metric}
    size_mb = gguf.stat().st_size / 1e6
    version = llama_cpp_version()
    if version is None:
        return Report(**base, validated=False, status="not_validated", reason=NOT_INSTALLED,
                      measured={"size_mb": size_mb}, passed=False).out()
    shipped = [json.loads(x) for x in (folder / EVAL_FILE).read_text().splitlines() if x.strip()]
    t0 = time.time()
    # the tokenizer and chat template (a vocab_only load has no training context, and llama.cpp warns about it)
    score = Runner(gguf, threads, 64)
    try:
        checked = check_tokenizer(score.detokenize, score.tokenize, shipped)
        if data is None:
            rows = shipped
        else:  # the user's rows, tokenized by the GGUF's own tokenizer and chat template
            from toolchain.runtime.devicedata import tokenize_rows

            rows = tokenize_rows(Path(data), score)
    finally:
        score.close()
    if not rows:
        raise ToolchainError(f"{data or folder / EVAL_FILE}: no rows to score")
    # scoring: every position's logits, in a context as long as the longest row
    score = Runner(gguf, threads, max(len(r["input_ids"]) for r in rows) + 8, logits_all=True)
    try:
        nll, n = 0.0, 0
        for r in rows:
            a, b = row_nll(score.logits(r["input_ids"]), r["labels"])
            nll, n = nll + a, n + b
    finally:
        score.close()
    acc = {"perplexity": metrics.perplexity(nll, n), "eval_tokens": n, "tokenizer_rows_checked": checked}
    # generation: last-position logits only, as llama.cpp runs for a user
    max_new = rec["metric"]["max_new_tokens"]
    first = rows[0].get("prompt_ids") or rows[0]["input_ids"]
    general = rt_retention.read(folder) if data is None else []  # scored as validate.retention scores it
    n_ctx = max([len(first) + LATENCY_TOKENS] + [len(r["prompt_ids"]) + max_new for r in rows if "prompt_ids" in r]
                + [len(r["prompt_ids"]) + rt_retention.MAX_NEW_TOKENS for r in general]) + 8
    gen = Runner(gguf, threads, n_ctx, logits_all=False)
    try:
        lat = latency(gen, first)
        acc.update(answers(gen, rows, metric, max_new, progress))
        if general:
            acc.update(rt_retention.score(general, [gen.text(gen.generate(r["prompt_ids"], rt_retention.MAX_NEW_TOKENS)
                                                              ["tokens"]) for r in general]))
    finally:
        gen.close()
    measured = {**lat, **acc, "size_mb": size_mb, "peak_rss_mb": peak_rss_mb()}
    gates = (check_gates(merge_gates(rec.get("gates", {}), target.get("gates", {})), measured, base["reference"], metric)
             if data is None else [])  # the gates are the shipped split's, as in validate.py
    passed = all(g["passed"] for g in gates)
    return Report(**base, provider="llama.cpp", validated=True, status="passed" if passed else "gates_missed",
                  data=str(data) if data else EVAL_FILE, measured=measured, gates=gates, passed=passed,
                  seconds=round(time.time() - t0, 1),
                  target_gates=target.get("gates") or None,
                  note=f"llama.cpp through llama-cpp-python {version}, {threads} thread(s)").out()
