"""JSONL validation, the chat loss mask, packing and the split."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from toolchain.hf import data
from toolchain.runtime.errors import ToolchainError
from toolchain.hf.models import load_tokenizer

CONV = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Two tickets, Oslo, 4 May. Ana Silva."},
    {"role": "assistant", "content": '{"name": "Ana Silva", "city": "Oslo", "qty": 2, "date": "05-04"}'},
    {"role": "user", "content": "Make it three."},
    {"role": "assistant", "content": '{"name": "Ana Silva", "city": "Oslo", "qty": 3, "date": "05-04"}'},
]


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.mark.parametrize("lines,expect", [
    (['{"text": "a"}', '{"text": "b"}', '{"text": "c"'], r"d.jsonl:3: not valid JSON"),
    (['{"text": "a"}', '{"prompt": "p", "completion": "c"}'], r"d.jsonl:2: mixes the 'prompt' shape"),
    (['{"messages": [{"role": "robot", "content": "x"}]}'], r"d.jsonl:1: key 'messages.0.role'"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], r"d.jsonl:1: key 'messages': .*role 'assistant'"),
    (['{"prompt": "p"}'], r"d.jsonl:1: key 'completion': Field required"),
    (['{"txt": "a"}'], r"d.jsonl:1: expected one of the keys"),
    (['[1, 2]'], r"d.jsonl:1: expected a JSON object"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, expect):
    with pytest.raises(ToolchainError, match=expect):
        data.read_jsonl(write(tmp_path, lines))


def test_finetune_with_malformed_data_leaves_nothing(tmp_path):
    bad = write(tmp_path, ['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
                           '{"messages": [oops]}'])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "toolchain", "finetune", "--model", "smollm2-135m", "--recipe",
                        "chat-lora", "--data", str(bad), "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2, r.stderr
    assert f"{bad}:2: not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def trained_text(tok, ex) -> str:
    return tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != data.IGNORE])


def test_chat_mask_is_exactly_the_assistant_turns_smollm2(smollm2):
    tok = load_tokenizer(smollm2)
    ex = data.encode(data.ChatRow.model_validate({"messages": CONV}), tok, 512)
    want = "".join(m["content"] + "<|im_end|>\n" for m in CONV if m["role"] == "assistant")
    assert trained_text(tok, ex) == want
    # and the tokens themselves: labels equal input_ids exactly where trained
    assert all(l in (data.IGNORE, i) for i, l in zip(ex["input_ids"], ex["labels"]))
    full = tok.apply_chat_template(CONV, tokenize=False)
    assert tok.decode(ex["input_ids"]) == full


def test_chat_mask_phi3_template_puts_eos_only_after_last_turn(tiny_phi3):
    tok = load_tokenizer(tiny_phi3)
    ex = data.encode(data.ChatRow.model_validate({"messages": CONV}), tok, 512)
    a1, a2 = CONV[2]["content"], CONV[4]["content"]
    assert tok.eos_token == "<|end|>"  # the template closes the whole conversation with eos_token
    assert trained_text(tok, ex) == f"{a1}<|end|>\n{a2}<|end|>\n<|end|>"


def test_completion_and_text_masks(smollm2):
    tok = load_tokenizer(smollm2)
    ex = data.encode(data.CompletionRow(prompt="Q: 2+2?\nA:", completion=" 4"), tok, 64)
    assert trained_text(tok, ex) == " 4" + tok.eos_token
    ex = data.encode(data.TextRow(text="plain text, all of it"), tok, 64)
    assert ex["labels"] == ex["input_ids"]
    assert len(data.encode(data.TextRow(text="word " * 100), tok, 16)["input_ids"]) == 16


def test_packing_keeps_examples_whole():
    exs = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([5, 4, 3, 6, 2], start=1)]
    packed = data.pack(exs, 10)
    assert [len(p["input_ids"]) for p in packed] == [9, 9, 2]
    assert sum((p["input_ids"] for p in packed), []) == sum((e["input_ids"] for e in exs), [])


def test_split_is_deterministic_and_disjoint():
    rows = list(range(100))
    a = data.split(rows, 0.2, seed=3)
    assert a == data.split(rows, 0.2, seed=3)
    assert a != data.split(rows, 0.2, seed=4)
    assert len(a[1]) == 20 and not set(a[0]) & set(a[1])


def test_shipped_dataset_is_reproducible_and_held_out(tmp_path, monkeypatch):
    """The generator reproduces the committed files byte for byte; eval names never occur in train."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", REPO / "recipes/data/make_chat_lora.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "__file__", str(tmp_path / "make.py"))
    gen.main()
    for name in ("train", "eval"):
        assert (tmp_path / "chat-lora" / f"{name}.jsonl").read_text() == (REPO / f"recipes/data/chat-lora/{name}.jsonl").read_text()
    names = lambda f: {json.loads(m.content)["name"] for r in data.read_jsonl(f) for m in r.messages if m.role == "assistant"}  # noqa: E731
    assert not names(REPO / "recipes/data/chat-lora/train.jsonl") & names(REPO / "recipes/data/chat-lora/eval.jsonl")
