"""ONNX Runtime GenAI on an artifact folder: greedy generation with timings (optionally with prompt-lookup
decoding), and prompt log-likelihoods. No torch."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from toolchain.runtime import session as session_mod
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.lookup import decode as lookup_decode
from toolchain.runtime.lookup import greedy
from toolchain.runtime.metrics import log_softmax


def load(folder: Path, provider: str = "cpu", options: Optional[dict] = None, session: Optional[dict] = None):
    """(model, tokenizer) for an onnxruntime-genai folder, on the given execution provider (onnxruntime-genai's
    name: cpu, cuda, dml, webgpu, qnn) with its options. "cpu" drops any EP genai_config.json names, so a QDQ
    model built for an NPU runs on the CPU EP. `session`: the settings from runtime/session.resolve (default: that
    of this folder with no --threads, i.e. this host's usable cores), applied as an overlay, the folder untouched."""
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.overlay(session_mod.overlay(session or session_mod.resolve(Path(folder))))
    cfg.clear_providers()
    if provider != "cpu":
        cfg.append_provider(provider)
        for k, v in (options or {}).items():
            cfg.set_provider_option(provider, k, str(v))
    model = og.Model(cfg)
    return model, og.Tokenizer(model)


def eos_ids(tok) -> tuple[int, ...]:
    """The tokenizer's end-of-sequence ids, as generate(lookup=...) takes them."""
    return tuple(int(e) for e in tok.eos_token_ids)


PRUNED = "this model computes logits for the last position only (quantize.prune_lm_head)"


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    ttft_s: float  # prompt processed and first new token chosen
    decode_s: float  # the remaining new tokens
    steps: int = 0  # forward passes after the first token (one per token without lookup)

    @property
    def decode_tok_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def generate(model, prompt_ids: list[int], max_new_tokens: int, force_length: bool = False, lookup: int = 0,
             eos: tuple[int, ...] = (), on_token: Optional[Callable[[int], None]] = None) -> Generation:
    """Greedy decoding. force_length keeps going past end-of-sequence, for timing a fixed number of tokens.
    lookup > 0: prompt-lookup decoding (runtime/lookup.py), with drafts of up to `lookup` tokens. Its tokens are
    greedy's, except at near-ties in a quantized model: its int8-activation MatMulNBits kernels give a position
    slightly different logits in a multi-token pass than in a one-token pass. `eos`: the end-of-sequence ids
    (eos_ids(tok)), needed with lookup. on_token: called with each new token as it is chosen (plain loop only;
    the timings include it, as a streaming caller sees them)."""
    if lookup > 0:
        return _generate_lookup(model, prompt_ids, max_new_tokens, force_length, lookup, tuple(eos))
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
        if on_token:
            on_token(out[-1])
    end = time.perf_counter()
    return Generation(out, len(prompt_ids), (t_first or end) - t0, end - (t_first or end), max(len(out) - 1, 0))


def _generate_lookup(model, prompt_ids: list[int], max_new: int, force_length: bool, k: int,
                     eos: tuple[int, ...]) -> Generation:
    import onnxruntime_genai as og

    masked, stop = (eos, ()) if force_length else ((), eos)  # masked: min_length's effect in the plain loop

    def forward(tokens: list[int]) -> np.ndarray:
        gen.append_tokens(np.asarray(tokens, dtype=np.int32))
        logits = gen.get_output("logits")[0]
        if len(logits) != len(tokens):
            raise ToolchainError(PRUNED + "; prompt lookup checks every drafted position: decode without lookup, or "
                                 "rebuild with `prune_lm_head: false`")
        return greedy(logits, masked)

    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new + 1)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    first = int(greedy(gen.get_logits(), masked)[-1])
    t_first = time.perf_counter()
    out, steps = lookup_decode(prompt_ids, first, forward, lambda n: gen.rewind_to(gen.token_count() - n),
                               max_new, k, stop)
    end = time.perf_counter()
    return Generation(out, len(prompt_ids), t_first - t0, end - t_first, steps)


def nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Sum of next-token negative log-likelihood over positions whose label is not -100, and their count."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(input_ids) + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(input_ids, dtype=np.int32))
    logits = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]  # [seq, vocab]
    if len(logits) != len(input_ids):  # PRUNED: one token per pass instead
        gen = og.Generator(model, params)
        logits = np.empty((len(input_ids), logits.shape[-1]), dtype=np.float32)
        for i, t in enumerate(input_ids):
            gen.append_tokens(np.asarray([t], dtype=np.int32))
            logits[i] = gen.get_output("logits")[0, -1]
    lab = np.asarray(labels[1:])
    keep = lab != -100
    logp = log_softmax(logits[:-1][keep])
    return float(-logp[np.arange(len(logp)), lab[keep]].sum()), int(keep.sum())
