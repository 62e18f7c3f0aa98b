"""Prompt-lookup decoding (transformers' `prompt_lookup_num_tokens`, llama.cpp's `lookup` example): greedy decoding
that drafts the next tokens by finding the context's last few tokens earlier in the context, and checks a whole
draft in one forward pass. Output is greedy's; it is faster where text repeats its context (extraction, quoting,
edits, a small model's loops) and costs a little where drafts are wrong. Runtime-agnostic and numpy-only: the
validator runs it on onnxruntime-genai, bench/lookup.py on llama.cpp too."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

NGRAM = (4, 3)  # the longest and shortest context tail a draft is looked up by. With 2-token tails, drafts came
# often and wrong: fixed 6-token drafts decoded 32 chat-lora answers on the cpu-int4 SmolLM2 at 150 tok/s against 196
# without lookup; with 3-token tails at 188 (one CPU thread, 2026-11-23)


def draft(context: Sequence[int], k: int, ngram: tuple[int, int] = NGRAM) -> list[int]:
    """The k tokens that followed the latest earlier occurrence of the context's last n tokens, for n from ngram[0]
    down to ngram[1]; [] when no tail occurs earlier."""
    a = np.asarray(context)
    for n in range(ngram[0], ngram[1] - 1, -1):
        if k <= 0 or len(a) <= n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(a[:-1], n)  # every earlier n-gram that has a follower
        hits = np.flatnonzero((windows == a[-n:]).all(axis=1))
        if len(hits):
            return a[hits[-1] + n: hits[-1] + n + k].tolist()
    return []


def greedy(logits, masked: Sequence[int] = ()) -> np.ndarray:
    """Each row's argmax over the last axis, `masked` token ids excluded (end-of-sequence while a length is forced)."""
    logits = np.array(logits, dtype=np.float32).reshape(-1, np.shape(logits)[-1])
    logits[:, list(masked)] = -np.inf
    return logits.argmax(-1)


def decode(context: list[int], first: int, forward: Callable[[list[int]], np.ndarray], rewind: Callable[[int], None],
           max_new: int, k: int, stop: Sequence[int] = ()) -> tuple[list[int], int]:
    """Greedy tokens after `first` (already chosen, not yet fed), up to max_new in all or a `stop` token (kept).

    forward(tokens) feeds tokens to the model and returns the greedy choice after each of them; rewind(n) drops the
    last n fed tokens from the KV cache. Each step feeds the last chosen token plus a draft, keeps the draft's prefix
    that greedy agrees with, and takes the first disagreeing position's choice as the next token. The draft length
    adapts as transformers' "heuristic" schedule does: it shrinks to what was accepted, and grows by 2 (up to k)
    after a draft was wholly accepted, since rejected positions still cost compute in the checking pass.
    Returns (tokens, forward passes)."""
    out, steps, want = [first], 0, k
    while len(out) < max_new and out[-1] not in stop:
        d = draft(context + out, min(want, max_new - len(out) - 1))
        pred = forward([out[-1], *d])
        n = 0
        while n < len(d) and pred[n] == d[n] and d[n] not in stop:
            n += 1
        out += d[:n] + [int(pred[n])]
        steps += 1
        if n < len(d):
            rewind(len(d) - n)
        if d:
            want = min(k, want + 2) if n == len(d) else max(1, n)
    return out, steps
