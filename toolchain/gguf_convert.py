"""Convert a GGUF file into an HF folder: fp32 safetensors plus a correct byte-level BPE tokenizer.

transformers loads GGUF weights well (`gguf_file=`, de-quantizing to fp32), but the tokenizer it rebuilds from a
GPT-2-style GGUF vocabulary adds a BOS to every encode (doubling it under a chat template) and breaks ONNX Runtime
GenAI's tokenizer. So the tokenizer is rebuilt here with the `tokenizers` library from the GGUF's own vocabulary,
merges and special tokens, with the pre-tokenizer llama.cpp uses for the vocabulary (`tokenizer.ggml.pre`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ToolchainError
from .fsutil import atomic_dir

# llama.cpp's pre-tokenizer names -> whether digits are split one by one before the GPT-2 byte-level regex.
PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}
CONTROL = 3  # gguf TokenType.CONTROL


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary, merges and control tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ToolchainError(f"GGUF tokenizer '{_field(reader, 'tokenizer.ggml.model')}' is not byte-level BPE (gpt2); "
                             "only byte-level BPE GGUF vocabularies are converted")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise ToolchainError(f"GGUF pre-tokenizer '{pre}' is not supported yet (known: {', '.join(PRE_TOKENIZERS)})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    types = _field(reader, "tokenizer.ggml.token_type")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    return tok, tokens


def convert_gguf(gguf_path: Path, out_dir: Path, progress: bool = True) -> Path:
    """Write config.json, model.safetensors, tokenizer files and source.json for `gguf_path` into `out_dir`."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    gguf_path = Path(gguf_path)
    reader = GGUFReader(gguf_path)
    bpe, tokens = build_tokenizer(reader)
    name = lambda key: tokens[_field(reader, key)] if _field(reader, key) is not None else None  # noqa: E731
    arch = _field(reader, "general.architecture")
    context = int(_field(reader, f"{arch}.context_length", 2048))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"), model_max_length=context, clean_up_tokenization_spaces=False,
    )
    if not progress:
        hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(
            {"gguf": str(gguf_path), "bytes": gguf_path.stat().st_size, "sha256": sha}, indent=2))
    return Path(out_dir)
