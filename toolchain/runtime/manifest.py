"""manifest.json of an artifact: what it is, where it came from, and the sha256 of every file. No torch."""
from __future__ import annotations

import json
from pathlib import Path

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import sha256_file

MANIFEST = "manifest.json"
EVAL_FILE = "eval.jsonl"  # the held-out split every artifact ships, tokenized (decoders) or as rows (encoders)
MODEL_CARD = "README.md"  # a decoder artifact's model card: its scores exist only after validation
PROFILE = "device_profile.json"  # `toolchain tune`'s session settings for one device; read strictly (runtime/session.py)
# Written after packaging (by validate, the reports and tune): not covered by the hashes.
OUTPUTS = {MANIFEST, "report.json", "report.md", "report.png", MODEL_CARD, PROFILE}


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder (relative POSIX paths), except the manifest and the reports."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in OUTPUTS}


def read(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ToolchainError(f"{path}: no manifest; pass an artifact folder written by `toolchain edge`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ToolchainError(f"{path}:{e.lineno}: manifest is not valid JSON ({e.msg})") from None


def verify(folder: Path) -> dict:
    """The manifest, after checking that every listed file exists with its recorded sha256 and nothing was added."""
    folder = Path(folder)
    man = read(folder)
    want, have = man.get("files", {}), file_hashes(folder)
    for name, sha in want.items():
        if name not in have:
            raise ToolchainError(f"{folder / name}: listed in the manifest but missing; copy the whole artifact folder again")
        if have[name] != sha:
            raise ToolchainError(f"{folder / name}: sha256 differs from the manifest (file changed or corrupted); "
                                 "copy the artifact again or rebuild it")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ToolchainError(f"{folder / extra[0]}: not in the manifest (unexpected file in the artifact); remove it")
    return man
