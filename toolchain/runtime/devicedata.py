"""Tokenize a user's JSONL on the device with the artifact's own tokenizer (onnxruntime-genai). No torch.

Perplexity is scored on the part a model should produce: the last assistant turn, the completion, or all of a
raw text. The prompt for the generation metric is the conversation up to that turn.
"""
from __future__ import annotations

import json
from pathlib import Path

from toolchain.runtime.rows import ChatRow, CompletionRow, read_jsonl
from toolchain.runtime.metrics import parse_constraints


def _ids(tok, text: str) -> list[int]:
    return [int(i) for i in tok.encode(text)]


def tokenize_rows(path: Path, tok) -> list[dict]:
    out = []
    for row in read_jsonl(path):
        if isinstance(row, ChatRow):
            msgs = [m.model_dump() for m in row.messages]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            prompt = tok.apply_chat_template(json.dumps(msgs[:last]), add_generation_prompt=True)
            full = tok.apply_chat_template(json.dumps(msgs[: last + 1]), add_generation_prompt=False)
            p_ids, ids = _ids(tok, prompt), _ids(tok, full)
            out.append({"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids):], "prompt_ids": p_ids,
                        "reference": msgs[last]["content"], "constraints": parse_constraints(prompt)})
        elif isinstance(row, CompletionRow):
            p_ids, ids = _ids(tok, row.prompt), _ids(tok, row.prompt + row.completion)
            out.append({"input_ids": ids, "labels": [-100] * len(p_ids) + ids[len(p_ids):], "prompt_ids": p_ids,
                        "reference": row.completion, "constraints": parse_constraints(row.prompt)})
        else:
            ids = _ids(tok, row.text)
            out.append({"input_ids": ids, "labels": ids})
    return out
