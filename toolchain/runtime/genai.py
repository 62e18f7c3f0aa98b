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


def load(folder: Path, provider: str = "cpu", options: Optional[dict] = None, session: Optional[dict] = None,
         adapter: Optional[str] = None):
    """(model, tokenizer) for an onnxruntime-genai folder, on the given execution provider (onnxruntime-genai's
    name: cpu, cuda, dml, webgpu, qnn) with its options. "cpu" drops any EP genai_config.json names, so a QDQ
    model built for an NPU runs on the CPU EP. `session`: the settings from runtime/session.resolve (default: that
    of this folder with no --threads, i.e. this host's usable cores), applied as an overlay, the folder untouched.
    adapter: a LoRA adapter to run with, by name (the folder's adapters/NAME.onnx_adapter) or as a path to an
    .onnx_adapter file; the model is then an `Adapted`, which generate and nll take in its place and whose use()
    switches adapters without loading the base again."""
    import onnxruntime_genai as og

    cfg = og.Config(str(folder))
    cfg.overlay(session_mod.overlay(session or session_mod.resolve(Path(folder))))
    cfg.clear_providers()
    if provider != "cpu":
        cfg.append_provider(provider)
        for k, v in (options or {}).items():
            cfg.set_provider_option(provider, k, str(v))
    model = og.Model(cfg)
    tok = og.Tokenizer(model)
    if adapter is None:
        return model, tok
    file = Path(adapter) if str(adapter).endswith(ADAPTER_SUFFIX) else Path(folder) / ADAPTERS_DIR / f"{adapter}{ADAPTER_SUFFIX}"
    name = file.name[: -len(ADAPTER_SUFFIX)]
    return Adapted(model, og.Adapters(model)).load(name, file).use(name), tok


ADAPTERS_DIR = "adapters"  # a multi-adapter artifact's adapters/<name>.onnx_adapter files
ADAPTER_SUFFIX = ".onnx_adapter"


@dataclass(frozen=True)
class Adapted:
    """One base model, the LoRA adapters loaded for it (og.Adapters, ONNX Runtime's .onnx_adapter files) and the
    adapter new generators run with (None: the base alone, its LoRA inputs left at their empty defaults). Every
    handle from use() shares the base and the loaded adapters: switching loads nothing."""
    model: object
    adapters: object
    name: Optional[str] = None
    loaded: frozenset = frozenset()

    def load(self, name: str, file: Path) -> "Adapted":
        """This handle with `file` loaded as adapter `name` (into the shared og.Adapters)."""
        if not Path(file).is_file():
            raise ToolchainError(f"{file}: no such adapter file")
        try:
            self.adapters.load(str(file), name)
        except Exception as e:  # onnxruntime-genai's message names the file and what is wrong with it
            raise ToolchainError(f"{file}: onnxruntime-genai cannot load this adapter: {e}") from None
        return Adapted(self.model, self.adapters, self.name, self.loaded | {name})

    def use(self, name: Optional[str]) -> "Adapted":
        if name is not None and name not in self.loaded:
            raise ToolchainError(f"adapter '{name}' is not loaded; loaded: {', '.join(sorted(self.loaded)) or 'none'}")
        return Adapted(self.model, self.adapters, name, self.loaded)


def base_model(model):
    """The og.Model under an `Adapted` (or the model itself)."""
    return model.model if isinstance(model, Adapted) else model


def new_generator(model, params):
    """og.Generator for a model or an `Adapted` (its adapter set active before any token is appended)."""
    import onnxruntime_genai as og

    gen = og.Generator(base_model(model), params)
    if isinstance(model, Adapted) and model.name is not None:
        gen.set_active_adapter(model.adapters, model.name)
    return gen


def decode(tok, ids) -> str:
    """tok.decode(ids), and "" for no ids: onnxruntime-genai 0.15.2's Tokenizer.decode([]) kills the process with
    SIGFPE (seen when an answer is only its end-of-sequence token, e.g. a tiny model's with an adapter)."""
    return tok.decode(ids) if len(ids) else ""


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

    params = og.GeneratorParams(base_model(model))
    total = len(prompt_ids) + max_new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total if force_length else 0)
    gen = new_generator(model, params)
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

    params = og.GeneratorParams(base_model(model))
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + max_new + 1)
    gen = new_generator(model, params)
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

    params = og.GeneratorParams(base_model(model))
    params.set_search_options(max_length=len(input_ids) + 1)
    gen = new_generator(model, params)
    gen.append_tokens(np.asarray(input_ids, dtype=np.int32))
    logits = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]  # [seq, vocab]
    if len(logits) != len(input_ids):  # PRUNED: one token per pass instead
        gen = new_generator(model, params)
        logits = np.empty((len(input_ids), logits.shape[-1]), dtype=np.float32)
        for i, t in enumerate(input_ids):
            gen.append_tokens(np.asarray([t], dtype=np.int32))
            logits[i] = gen.get_output("logits")[0, -1]
    return _label_nll(logits, labels)


def _label_nll(logits: np.ndarray, labels: list[int]) -> tuple[float, int]:
    """Sum of next-token NLL of a row's logits [seq, vocab] where the label is not -100, and their count."""
    lab = np.asarray(labels[1:])
    keep = lab != -100
    logp = log_softmax(logits[:-1][keep])
    return float(-logp[np.arange(len(logp)), lab[keep]].sum()), int(keep.sum())


def nll_then_generate(model, input_ids: list[int], labels: list[int], prompt_len: int, max_new_tokens: int,
                      eos: tuple[int, ...]) -> Optional[tuple[float, int, Generation]]:
    """nll() of the whole row, then greedy generation after its first `prompt_len` tokens, from one prefill: the
    answer's first token is read off the same pass's logits, the cache rewound to the prompt. Row and prompt are
    scored as nll() and generate() score them (the prompt's cache is the same computation, causal), at one prefill
    per row instead of two: on a 2-core AVX2 EPYC prefill runs at about 260 tok/s, so a chat row's second prefill
    was 0.4 s. Generation timings start after the first token; ttft_s is left 0. None for a PRUNED model (it has no
    logits to score the row by in one pass)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(base_model(model))
    params.set_search_options(do_sample=False, max_length=max(len(input_ids), prompt_len + max_new_tokens) + 1)
    gen = new_generator(model, params)
    gen.append_tokens(np.asarray(input_ids, dtype=np.int32))
    logits = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
    if len(logits) != len(input_ids):
        return None
    nll_sum, count = _label_nll(logits, labels)
    out = [int(np.argmax(logits[prompt_len - 1]))]
    t0 = time.perf_counter()
    if max_new_tokens > 1 and out[0] not in eos:
        gen.rewind_to(prompt_len)
        gen.append_tokens(np.asarray(out, dtype=np.int32))
        while len(out) < max_new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            if out[-1] in eos:
                break
    return nll_sum, count, Generation(out, prompt_len, 0.0, time.perf_counter() - t0, len(out) - 1)
