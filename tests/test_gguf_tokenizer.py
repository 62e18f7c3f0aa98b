"""The tokenizer rebuilt from the shipped GGUF: ids match the GGUF vocabulary, decode round-trips exactly."""
from __future__ import annotations

import pytest
import torch
from gguf import GGUFReader
from tokenizers import Tokenizer

from toolchain.hf import load_causal_lm, load_tokenizer
from toolchain.sources import package_file, resolve

STRINGS = [
    "Hello world",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé àccents, ß, Ærø, 日本語のテキスト, 한국어, русский",
    "emoji 🤗🚀👩‍💻 and flags 🇵🇹",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    return -x\n",
    "lots    of     spaces\n\n\n\nand newlines   \t\t tabs  ",
    "numbers 12345 and 3.14159 and 1,000,000",
    "  leading and trailing  ",
]


@pytest.fixture(scope="module")
def gguf_tokens():
    card = resolve("smollm2-135m").card
    return GGUFReader(package_file(card)).fields["tokenizer.ggml.tokens"].contents()


@pytest.fixture(scope="module")
def tok(smollm2):
    return load_tokenizer(smollm2)


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_gguf_vocab_and_round_trip(tok, gguf_tokens, smollm2, text):
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert all(0 <= i < len(gguf_tokens) for i in ids)
    assert tok.convert_ids_to_tokens(ids) == [gguf_tokens[i] for i in ids]
    assert tok.decode(ids) == text
    # the raw tokenizer.json (what ONNX Runtime GenAI reads) gives the same ids
    assert Tokenizer.from_file(str(smollm2 / "tokenizer.json")).encode(text, add_special_tokens=True).ids == ids


def test_known_ids(tok):
    assert tok("Hello")["input_ids"] == [19556]
    assert tok("<|im_start|>")["input_ids"] == [1] and tok("<|im_end|>")["input_ids"] == [2]
    assert tok.convert_ids_to_tokens(tok("123")["input_ids"]) == ["1", "2", "3"]  # digits split one by one
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"


def test_chat_template_from_gguf_without_doubled_bos(tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    ids = tok.apply_chat_template(msgs)
    assert ids[0] == 1 and ids[1] != 1
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")
    assert tok.decode(ids) == text


def test_converted_weights_equal_gguf_load(smollm2):
    from transformers import AutoModelForCausalLM

    src = package_file(resolve("smollm2-135m").card)
    direct = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    ids = torch.tensor([[1, 19556, 216, 33, 34, 2]])
    with torch.no_grad():
        diff = (direct(ids).logits - load_causal_lm(smollm2)(ids).logits).abs().max().item()
    assert diff < 1e-4
