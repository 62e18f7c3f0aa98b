"""ONNX Runtime GenAI on an artifact folder: greedy generation with timings, and prompt log-likelihoods. No torch."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .metrics import log_softmax


def load(folder: Path, provider: str = "cpu", options: Optional[dict] = None):
    """(model, tokenizer) for an onnxruntime-genai folder, on the given execution provider (onnxruntime-genai's
    name: cpu, cuda, dml, webgpu, qnn) with its options. "cpu" drops any EP genai_config.json names, so a QDQ
    model built for an NPU runs on the CPU EP."""
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.clear_providers()
    if provider != "cpu":
        cfg.append_provider(provider)
        for k, v in (options or {}).items():
            cfg.set_provider_option(provider, k, str(v))
    model = og.Model(cfg)
    return model, og.Tokenizer(model)


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    ttft_s: float  # prompt processed and first new token chosen
    decode_s: float  # the remaining new tokens

    @property
    def decode_tok_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def generate(model, prompt_ids: list[int], max_new_tokens: int, force_length: bool = False) -> Generation:
    """Greedy decoding. force_length keeps going past end-of-sequence, for timing a fixed number of tokens."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt_ids) + max_new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total if force_length else 0)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    out = []
    t_first = None
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
        if t_first is None:
            t_first = time.perf_counter()
    end = time.perf_counter()
    return Generation(out, len(prompt_ids), (t_first or end) - t0, end - (t_first or end))


def nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum of next-token negative log-likelihood over positions whose label is not -100, and their count."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(input_ids) + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(input_ids, dtype=np.int32))
    logits = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]  # [seq, vocab]
    lab = np.asarray(labels[1:])
    keep = lab != -100
    logp = log_softmax(logits[:-1][keep])
    return float(-logp[np.arange(len(logp)), lab[keep]].sum()), int(keep.sum())
