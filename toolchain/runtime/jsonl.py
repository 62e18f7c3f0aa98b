"""Reading JSONL line by line with errors that name `file:line` (torch-free; shared by training and the device)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from toolchain.runtime.errors import ToolchainError


def objects(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line; a missing file or bad JSON fails naming the line."""
    path = Path(path)
    if not path.is_file():
        raise ToolchainError(f"{path}: data file not found")
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ToolchainError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
