"""Turn a model name or path into a local HF folder, with no download unless the user is online.

Three sources (see schema.Source): a hub id read from the local HF cache, a local folder, or a GGUF file shipped
inside an installed package, which is converted once into a cached HF folder (toolchain.gguf_convert).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from toolchain.config.catalog import MODELS_DIR, all_cards, get_card, home
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import sha256_file
from toolchain.config.schema import ModelCard


@dataclass
class Resolved:
    card: ModelCard
    path: Path  # a local HF folder: config.json, safetensors, tokenizer
    trust_remote_code: bool = False  # the user opted in (only a card that needs it asks)


def _how_to_provide(card: ModelCard) -> str:
    return (
        f"the weights of '{card.name}' ({card.source.hub}) are not on this machine and could not be downloaded.\n"
        f"Provide them one of two ways:\n"
        f"  1. a local HF folder:  --model-path /path/to/{card.source.hub.split('/')[-1]}   "
        f"(make edge MODEL={card.name} MODEL_PATH=/path/...)\n"
        f"  2. a populated HF cache: on a machine with network run\n"
        f"       huggingface-cli download {card.source.hub}\n"
        f"     and copy ~/.cache/huggingface (or set HF_HOME) to this machine."
    )


def package_file(card: ModelCard) -> Optional[Path]:
    """The GGUF file or HF folder inside its installed package, found without importing the package."""
    spec = importlib.util.find_spec(card.source.package)
    if spec is None or not spec.origin:
        return None
    f = Path(spec.origin).parent / card.source.package_path
    return f if f.exists() else None


def _hub_cached(repo: str) -> Optional[Path]:
    try:  # a core-only install (no tokenizers, so no huggingface_hub) has no HF cache to read
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        return None


def availability(card: ModelCard) -> tuple[bool, str]:
    """(whether the weights are on this machine, where from or why not), for `toolchain models`. Never downloads."""
    s = card.source
    if s.package:
        return (True, f"package {s.package}") if package_file(card) else (False, s.pip or f"install {s.package}")
    if s.path:
        return (True, s.path) if (Path(s.path) / "config.json").is_file() else (False, f"{s.path} missing")
    return (True, "HF cache") if _hub_cached(s.hub) else (False, "needs --model-path or HF cache")


def _from_package(card: ModelCard) -> Path:
    src = package_file(card)
    if src is None:
        raise ToolchainError(
            f"model '{card.name}' needs {card.source.package_path} from the package '{card.source.package}', "
            f"which is not installed. Install it with: {card.source.pip or 'pip install ' + card.source.package} "
            f"(or run `make setup`)"
        )
    if src.is_dir():
        return src
    from toolchain.config.gguf_convert import VERSION, convert_gguf

    out = home() / "models" / f"{card.name}-{sha256_file(src)[:12]}-v{VERSION}"
    if not (out / "config.json").is_file():
        convert_gguf(src, out)
    return out


def _from_hub(card: ModelCard) -> Path:
    local = _hub_cached(card.source.hub)
    if local:
        return local
    from huggingface_hub import snapshot_download

    try:  # online users get the weights; offline ones get the how-to, not a traceback
        return Path(snapshot_download(card.source.hub, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]))
    except Exception:
        raise ToolchainError(_how_to_provide(card)) from None


def resolve(model: str, model_path: Optional[str] = None, trust_remote_code: bool = False) -> Resolved:
    """NAME (a card) or PATH (a local HF folder) -> a local folder, checking the card's requirements."""
    if model not in all_cards() and Path(model).is_dir():
        model_path, card = model, _card_for_folder(Path(model))
    else:
        card = get_card(model)
    if card.trust_remote_code and not trust_remote_code:
        raise ToolchainError(
            f"model '{card.name}' runs code from its repository (trust_remote_code) and needs {card.requires or 'extra packages'}. "
            f"Read {MODELS_DIR / (card.name + '.yaml')}, then opt in with --trust-remote-code."
        )
    for pkg in card.requires:
        if importlib.util.find_spec(pkg) is None:
            raise ToolchainError(f"model '{card.name}' needs the package '{pkg}': pip install {pkg}")
    if model_path:
        path = Path(model_path)
        if not (path / "config.json").is_file():
            raise ToolchainError(f"{path}: not an HF model folder (no config.json); pass the folder that holds config.json")
    elif card.source.package:
        path = _from_package(card)
    elif card.source.path:
        path = Path(card.source.path)
    else:
        path = _from_hub(card)
    return Resolved(card, path, trust_remote_code)


def _card_for_folder(path: Path) -> ModelCard:
    """A card for a bare local folder: architecture from config.json, LoRA targets from a card of the same
    architecture (every linear layer if there is none)."""
    import json

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ToolchainError(f"{path}: not an HF model folder (no config.json)")
    cfg = json.loads(cfg_file.read_text())
    arch = cfg.get("model_type", "unknown")
    twin = next((c for c in all_cards().values() if c.architecture == arch), None)
    return ModelCard(
        name=path.name,
        architecture=arch,
        params="?",
        source={"path": str(path)},
        license="see the folder",
        context_length=cfg.get("max_position_embeddings", 2048),
        lora_target_modules=twin.lora_target_modules if twin else ["all-linear"],
        kind=twin.kind if twin else "decoder",  # a BERT folder takes the encoder path, like the minilm-l6 card
    )
