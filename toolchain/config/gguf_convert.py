"""Convert a GGUF file into an HF folder: fp32 safetensors plus a correct byte-level BPE tokenizer.

transformers loads GGUF weights well (`gguf_file=`, de-quantizing to fp32), but the tokenizer it rebuilds from a
GPT-2-style GGUF vocabulary adds a BOS to every encode (doubling it under a chat template) and breaks ONNX Runtime
GenAI's tokenizer. So the tokenizer is rebuilt here with the `tokenizers` library from the GGUF's own vocabulary,
merges and control tokens, with the pre-tokenizer llama.cpp uses for that vocabulary (`tokenizer.ggml.pre`).

Entry point: `convert_gguf(gguf_path, out_dir)`. The folder appears atomically (built beside `out_dir`, then renamed).
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

from toolchain.runtime.errors import ToolchainError
from toolchain.runtime.fsutil import atomic_dir, sha256_file

# llama.cpp pre-tokenizer name -> whether digits are split one by one before the GPT-2 byte-level regex
# (llama.cpp's SMOLLM pre-tokenizer is "\p{N}" then the GPT-2 regex; `tokenizers`' ByteLevel regex is the GPT-2 one).
PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}
VERSION = 2  # part of the cache key: bump when the converted folder changes
CONTROL = 3  # gguf.TokenType.CONTROL: these become special tokens (never split, skipped by decode(skip_special_tokens))


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return f.contents() if f is not None else default


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary, merges and control tokens; also returns the token list."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

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
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; ids are unchanged
    types = _field(reader, "tokenizer.ggml.token_type")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    if _field(reader, "tokenizer.ggml.add_bos_token", False):
        bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
        bos = tokens[bos_id]
        tok.post_processor = processors.Sequence([tok.post_processor, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])])
    return tok, tokens


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write config.json, model.safetensors (fp32), tokenizer files, generation_config.json and source.json
    for `gguf_path` into `out_dir` (replacing it atomically); return `out_dir`."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ToolchainError(f"GGUF file {gguf_path} does not exist")
    reader = GGUFReader(gguf_path)
    bpe, tokens = build_tokenizer(reader)
    name = lambda key: tokens[_field(reader, key)] if _field(reader, key) is not None else None  # noqa: E731
    arch = _field(reader, "general.architecture")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
        unk_token=name("tokenizer.ggml.unknown_token_id"), pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"), clean_up_tokenization_spaces=False,
        model_max_length=int(_field(reader, f"{arch}.context_length", 2048)),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)), add_eos_token=False,
    )
    with _parsed_once(gguf_path, reader):
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)  # a progress bar
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tok, key))
        setattr(model.generation_config, key, getattr(tok, key))
    sha = sha256_file(gguf_path)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp, save_jinja_files=False)  # chat_template inside tokenizer_config.json
        (tmp / "source.json").write_text(json.dumps(
            {"gguf": str(gguf_path.resolve()), "bytes": gguf_path.stat().st_size, "sha256": sha}, indent=2) + "\n")
    return out_dir


@contextlib.contextmanager
def _parsed_once(gguf_path: Path, reader):
    """Lend transformers' GGUF loader the reader already parsed here, and gguf's tensor name map built once.

    The loader parses the file's metadata twice (config, then weights: about 5 s each for SmolLM2's 49k-token
    vocabulary) and rebuilds the name map for each of the model's 397 modules. Lending both took the conversion, the
    first thing a user waits for from an empty TOOLCHAIN_HOME, from 33.3 s to 10.9 s (2-core AMD EPYC Zen 3, AVX2).
    The weights come out bit for bit the same (tests/test_gguf_tokenizer.py)."""
    import gguf

    own_reader, own_map = gguf.GGUFReader, gguf.get_tensor_name_map
    target = gguf_path.resolve()

    def reader_for(path, *args, **kwargs):
        return reader if not args and not kwargs and Path(path).resolve() == target else own_reader(path, *args, **kwargs)

    gguf.GGUFReader, gguf.get_tensor_name_map = reader_for, functools.lru_cache(maxsize=None)(own_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = own_reader, own_map
