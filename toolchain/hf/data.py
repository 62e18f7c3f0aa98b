"""A recipe's JSONL data (the shapes in runtime/rows.py), split and tokenized with a loss mask.

Chat trains on assistant tokens only (content and end-of-turn token), the completion shape on the completion
only, raw text on everything. The mask comes from character spans mapped through the tokenizer's offsets, so it
is exact for any fast tokenizer and chat template.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.rows import ChatRow, CompletionRow, Row, TextRow, read_jsonl

IGNORE = -100


def split(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic train/eval split: the same seed gives the same split."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(len(rows) * eval_fraction))
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def _spans(row: Row, tok) -> tuple[str, list[tuple[int, int]]]:
    """The full text and the character spans that carry loss."""
    if isinstance(row, TextRow):
        return row.text, [(0, len(row.text))]
    if isinstance(row, CompletionRow):
        text = row.prompt + row.completion + (tok.eos_token or "")
        return text, [(len(row.prompt), len(text))]
    if not tok.chat_template:
        raise ToolchainError("the tokenizer has no chat template, so 'messages' data cannot be rendered; "
                             "use prompt/completion rows or a model whose card gives a chat template")
    msgs = [m.model_dump() for m in row.messages]
    full = tok.apply_chat_template(msgs, tokenize=False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not full.startswith(prefix):
            raise ToolchainError("the chat template does not render conversations incrementally; cannot mask turns")
        # The turn ends where rendering it alone stops agreeing with the whole conversation: templates that close
        # the text with an end-of-sequence token put it after the last turn only.
        end = len(os.path.commonprefix([upto, full]))
        spans.append((len(prefix), end))
    return full, spans


def encode(row: Row, tok, max_length: int) -> dict:
    """input_ids and labels (IGNORE where no loss), truncated to max_length."""
    text, spans = _spans(row, tok)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tid, (start, end) in zip(ids, enc["offset_mapping"]):
        inside = any(a <= start < end <= b for a, b in spans)  # the whole token lies in a trained span
        labels.append(tid if inside else IGNORE)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Greedy packing: whole examples side by side until the next one would not fit."""
    out, cur = [], {"input_ids": [], "labels": []}
    for ex in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ex["input_ids"]) > max_length:
            out.append(cur)
            cur = {"input_ids": [], "labels": []}
        cur["input_ids"] += ex["input_ids"]
        cur["labels"] += ex["labels"]
    if cur["input_ids"]:
        out.append(cur)
    return out


def generation_pair(row: Row, tok) -> Optional[tuple[str, str]]:
    """(prompt text, reference answer) for scoring by greedy generation; None for raw text."""
    if isinstance(row, CompletionRow):
        return row.prompt, row.completion
    if isinstance(row, ChatRow):
        msgs = [m.model_dump() for m in row.messages]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return tok.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True), msgs[last]["content"]
    return None


@dataclass
class Dataset:
    train: list[dict]  # tokenized (packed when the recipe asks)
    eval: list[dict]  # tokenized held-out examples, for loss/perplexity
    eval_rows: list  # the held-out rows themselves, for generation metrics


def mix(train_rows: list, replay_rows: list, fraction: float) -> list:
    """The task's rows, then replay rows (repeated in order when there are too few) until they are `fraction` of
    the whole; step_indices samples the list uniformly, so each step trains on about that share of replay."""
    if not replay_rows or fraction == 0:
        return list(train_rows)
    n = round(len(train_rows) * fraction / (1 - fraction))
    return list(train_rows) + [replay_rows[i % len(replay_rows)] for i in range(n)]


def load(recipe, recipe_file: Path, tok, replay: list = ()) -> Dataset:
    """The recipe's data, split and tokenized: its eval file, or without one a seeded held-out split of train.
    config.catalog.open_recipe has already pointed data.train/data.eval at the user's files (--data, --eval-data).
    replay: chat rows mixed into train (after the split: never scored) as data.replay.fraction of it."""
    base = recipe_file.parent  # the paths are absolute after open_recipe; a bare Recipe may hold relative ones
    train_rows = read_jsonl(base / recipe.data.train)
    if recipe.data.eval:
        eval_rows = read_jsonl(base / recipe.data.eval)
    else:
        train_rows, eval_rows = split(train_rows, recipe.data.eval_fraction, recipe.train.seed)
    n = recipe.data.max_length
    train = [encode(r, tok, n) for r in mix(train_rows, list(replay), recipe.data.replay.fraction)]
    if recipe.data.packing:
        train = pack(train, n)
    return Dataset(train, [encode(r, tok, n) for r in eval_rows], eval_rows)
