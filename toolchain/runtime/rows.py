"""The three JSONL row shapes a recipe's data and a device's --data file use, validated line by line.

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}   chat
    {"prompt": ..., "completion": ...}                                                          completion
    {"text": ...}                                                                               raw domain text

No torch: the device reads the same shapes (runtime/devicedata.py) as training does (hf/data.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from toolchain.runtime import jsonl
from toolchain.runtime.errors import ToolchainError


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(_Row):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRow(_Row):
    messages: list[Message]

    @field_validator("messages")
    @classmethod
    def _has_assistant(cls, v):
        if not any(m.role == "assistant" for m in v):
            raise ValueError("needs at least one message with role 'assistant' to learn from")
        return v


class CompletionRow(_Row):
    prompt: str
    completion: str


class TextRow(_Row):
    text: str


Row = Union[ChatRow, CompletionRow, TextRow]
SHAPES = {"messages": ChatRow, "prompt": CompletionRow, "text": TextRow}


def read_jsonl(path: Path) -> list[Row]:
    """Every line validated; the first bad one fails with `file:line: what is wrong`."""
    rows, shape = [], None
    for n, obj in jsonl.objects(path):
        if not isinstance(obj, dict):
            raise ToolchainError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        key = next((k for k in SHAPES if k in obj), None)
        if key is None:
            raise ToolchainError(f"{path}:{n}: expected one of the keys 'messages', 'prompt'+'completion' or 'text'")
        if shape is None:
            shape = key
        elif key != shape:
            raise ToolchainError(f"{path}:{n}: mixes the '{key}' shape into a file of '{shape}' rows; use one shape per file")
        try:
            rows.append(SHAPES[key].model_validate(obj))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ToolchainError(f"{path}:{n}: key '{where}': {err['msg']}") from None
    if not rows:
        raise ToolchainError(f"{path}: no rows")
    return rows
