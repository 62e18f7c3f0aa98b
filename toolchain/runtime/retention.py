"""Retention: does a tuned model still answer everyday questions? No torch (the device scores it too).

The set is recipes/data/general/retention.jsonl (written by recipes/data/make_general.py, Apache-2.0), asked
under a generic system prompt, never the task's. Every decoder artifact ships it tokenized as retention.jsonl
(checked by the manifest's sha256), so `toolchain validate` scores the artifact on exactly the prompts the torch
models were scored on. Each answer is checked by code, by the item's kind:

    fact    an accepted answer occurs in the reply (whole words, case ignored)
    number  the first number in the reply that is not one of the question's is the answer ("2 + 3 = 5" passes)
    word    the reply is one word (a final full stop allowed) and an accepted answer
    french  the reply holds an accepted French word or phrase
    list    the reply names at least three different accepted items
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

RETENTION_FILE = "retention.jsonl"  # the tokenized set an artifact ships
SYSTEM = "You are a helpful assistant."  # the generic system prompt retention and replay are asked under
MAX_NEW_TOKENS = 24  # enough for every accepted answer; short, so scoring stays cheap
# the torch models answer the general prompts (retention, replay) this many at a time: the 48 retention questions in
# one batch. On a 2-core AMD EPYC (AVX2), SmolLM2: the 92 replay answers took 30.8 s against 54.0 s in batches of
# 16, retention 10.9 against 16.9 s, the same texts (a decode step reads the weights once for the whole batch)
GENERAL_BATCH = 48
KINDS = ("fact", "number", "word", "french", "list")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")
_WORDS = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")


def read(folder: Path) -> list[dict]:
    """An artifact's retention set (RETENTION_FILE); empty for an artifact packaged before it shipped one."""
    f = Path(folder) / RETENTION_FILE
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def messages(prompt: str) -> list[dict]:
    """The conversation a retention (or replay) prompt is asked in."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![^\W_]){re.escape(phrase.lower())}(?![^\W_])", text.lower()) is not None


def check(item: dict, reply: str) -> bool:
    """Whether `reply` answers `item` (its kind and accepted answers) correctly."""
    kind, answers, reply = item["kind"], item["answers"], reply.strip()
    if kind in ("fact", "french"):
        return any(_has(reply, a) for a in answers)
    if kind == "number":
        asked = {float(x) for x in _NUMBER.findall(item["prompt"])}
        said = [float(x) for x in _NUMBER.findall(reply.replace(",", ""))]
        new = [x for x in said if x not in asked]
        return bool(new) and new[0] == float(answers[0])
    if kind == "word":
        words = _WORDS.findall(reply)
        return len(words) == 1 and reply.rstrip(".!").strip() == words[0] and words[0].lower() in {a.lower() for a in answers}
    if kind == "list":
        named = {a.lower() for a in answers if _has(reply, a)}
        return len(named) >= 3
    raise ValueError(f"retention item {item.get('id')}: unknown kind '{kind}' (known: {', '.join(KINDS)})")


def score(items: Sequence[dict], replies: Sequence[str]) -> dict:
    """{'retention': fraction right, 'retention_items': n, 'retention_by_kind': {kind: fraction}}."""
    if len(items) != len(replies) or not items:
        raise ValueError("retention needs equal, non-empty lists of items and replies")
    right = [check(it, r) for it, r in zip(items, replies)]
    by_kind = {}
    for k in KINDS:
        ok = [r for it, r in zip(items, right) if it["kind"] == k]
        if ok:
            by_kind[k] = sum(ok) / len(ok)
    return {"retention": sum(right) / len(right), "retention_items": len(right), "retention_by_kind": by_kind}
