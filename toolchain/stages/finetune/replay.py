"""Replay data for a decoder fine-tune: the base model's own greedy answers to general prompts (self-distillation),
asked under the generic system prompt, as chat rows mixed into the task's training data (recipe data.replay).

The answers are generated once per content and cached in TOOLCHAIN_HOME/replay/<key>.jsonl; the key hashes the base
weights and tokenizer files, the prompts file and the generation settings, so every recipe and method on one base
shares them, and a changed prompt or weight file generates them again. An answer cut at max_new_tokens keeps its
whole sentences only (an answer with none is dropped): the model must not learn to stop mid-sentence.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

from toolchain.config.catalog import home, replay_prompts
from toolchain.hf.evaluate import generate
from toolchain.hf.models import load_causal_lm, working_dtype
from toolchain.hf.retention import prompt, read_items
from toolchain.runtime import retention as rt
from toolchain.runtime.fsutil import sha256_file
from toolchain.runtime.rows import read_jsonl

_SENTENCE_END = re.compile(r"[.!?)](?=\s|$)")


def whole_sentences(answer: str) -> str:
    """The answer up to its last sentence end ('' when it has none)."""
    answer = answer.strip()
    ends = [m.end() for m in _SENTENCE_END.finditer(answer)]
    return answer[: ends[-1]] if ends else ""


def key(src, rec, rec_file: Path) -> Optional[str]:
    """The content key of a recipe's replay data on this base (None: the recipe replays nothing)."""
    spec = rec.data.replay
    if spec.fraction == 0:
        return None
    files = sorted(src.path.glob("*.safetensors")) + sorted(src.path.glob("tokenizer*.json")) + [src.path / "config.json"]
    h = hashlib.sha256(json.dumps({"model": src.card.name, "files": [sha256_file(f) for f in files if f.is_file()],
                                   "prompts": sha256_file(replay_prompts(rec, rec_file)), "system": rt.SYSTEM,
                                   "max_new_tokens": spec.max_new_tokens, "greedy": True}).encode())
    return h.hexdigest()[:16]


def rows(src, rec, rec_file: Path, tok, load_base: Optional[Callable] = None) -> tuple[list, dict]:
    """(the replay chat rows, what they are: key, count, cached or generated). Nothing when data.replay.fraction
    is 0. load_base(): the base in its working dtype, called only when the answers must be generated (default: a
    copy loaded here), so that a fine-tune which trains on that base loads it once."""
    k = key(src, rec, rec_file)
    if k is None:
        return [], {"fraction": 0.0}
    cache = home() / "replay" / f"{k}.jsonl"
    info = {"key": k, "fraction": rec.data.replay.fraction, "file": str(cache)}
    if cache.is_file():
        print(f"replay data: cached in {cache}", flush=True)
        out = _read(cache)
        return out, {**info, "rows": len(out), "generated": False}
    items = read_items(replay_prompts(rec, rec_file))
    # in the dtype the fine-tune scores the base in: a large model's own bf16, not an fp32 copy (Phi-3-mini's took
    # 16.7 GB here); the key needs no dtype, the weight files it hashes decide it
    model = load_base() if load_base is not None else \
        load_causal_lm(src.path, src.trust_remote_code, dtype=working_dtype(src.path))
    answers = generate(model, tok, [prompt(tok, it["prompt"]) for it in items], rec.data.replay.max_new_tokens,
                       rt.GENERAL_BATCH, desc="replay: base answers")
    lines = [json.dumps({"messages": rt.messages(it["prompt"]) + [{"role": "assistant", "content": a}]},
                        ensure_ascii=False) + "\n"
             for it, a in ((it, whole_sentences(a)) for it, a in zip(items, answers)) if a]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(lines))
    os.replace(tmp, cache)
    out = _read(cache)
    if not out:
        print(f"replay: the base gave no answer with a whole sentence to {len(items)} prompts; training on the task "
              "data alone", flush=True)
    return out, {**info, "rows": len(out), "prompts": len(items), "generated": True}


def _read(cache: Path) -> list:
    return read_jsonl(cache) if cache.stat().st_size else []  # empty: a base (a random test model) with no sentences
