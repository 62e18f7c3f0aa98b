"""Shared fixtures: a tiny random Phi-3 (same architecture as Phi-3-mini) and the real SmolLM2 folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never touches the network


def pytest_configure(config):
    """Each test session gets its own TOOLCHAIN_HOME (converted weights, cached base scores), removed at the end,
    so no run reads what another left behind. TOOLCHAIN_TEST_HOME keeps one across sessions, for debugging."""
    import tempfile

    keep = os.environ.get("TOOLCHAIN_TEST_HOME")
    home = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="toolchain-test-home-"))
    config._toolchain_home = None if keep else home
    os.environ["TOOLCHAIN_HOME"] = str(home)


def pytest_unconfigure(config):
    import shutil

    if getattr(config, "_toolchain_home", None):
        shutil.rmtree(config._toolchain_home, ignore_errors=True)

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_tiny_phi3(out: Path, hidden_size: int = 64, intermediate_size: int = 128, vocab_size: int = 0,
                   **config) -> Path:
    """A 2-layer random Phi-3 with a small byte-level BPE tokenizer (512 ids) trained on the recipe's data; with
    vocab_size, reserved tokens fill it up to that size (the corpus only supports ~850 learned ids). `config` sets
    any other Phi3Config field (rope_scaling, heads, tying, ...)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

    rows = [json.loads(x) for x in (REPO / "recipes/data/chat-lora/train.jsonl").read_text().splitlines()]
    corpus = [m["content"] for r in rows for m in r["messages"]]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=PHI3_SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=PHI3_TEMPLATE,
                                  additional_special_tokens=PHI3_SPECIALS[1:])
    if vocab_size > len(tok):
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - len(tok))])
    torch.manual_seed(0)
    fields = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
              "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rope_scaling": None,
              "tie_word_embeddings": False, **config}
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     **fields)
    model = Phi3ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


# Tiny shapes of each Phi card (config/shapes.py has the real ones): 2 layers, head_dim 32, and the real configs'
# kinds: intermediate/hidden 8/3 (mini) and 3.5 (medium), GQA 4:1 (medium) and 3:1 (4-mini), LongRoPE with
# original 4096 < max 131072, partial rotary 0.75, tied embeddings, the real vocabulary/hidden ratio (6 to 65).
# Every vocabulary is wider than any projection, as in the real models (no builder LM-head clash).
TINY_PHI = {
    "phi-3-mini": dict(hidden_size=96, intermediate_size=256, num_attention_heads=3, num_key_value_heads=3,
                       vocab_size=1024),
    "phi-3-mini-128k": dict(hidden_size=96, intermediate_size=256, num_attention_heads=3, num_key_value_heads=3,
                            vocab_size=1024),
    "phi-3-medium": dict(hidden_size=128, intermediate_size=448, num_attention_heads=4, num_key_value_heads=1,
                         vocab_size=800),
    "phi-3.5-mini": dict(hidden_size=96, intermediate_size=256, num_attention_heads=3, num_key_value_heads=3,
                         vocab_size=1024),
    "phi-4-mini": dict(hidden_size=192, intermediate_size=512, num_attention_heads=3, num_key_value_heads=1,
                       vocab_size=12288),
}


def make_tiny_phi(card: str, out: Path) -> Path:
    """A tiny random model of a Phi card's shape: the card's real config.json fields (config/shapes.py) with the
    dimensions of TINY_PHI[card] and 2 layers."""
    from toolchain.config.shapes import phi3_config

    cfg = phi3_config(card, num_hidden_layers=2, **TINY_PHI[card])
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype", "bos_token_id",
                                                       "eos_token_id", "pad_token_id")}
    return make_tiny_phi3(out, **keep)


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory) -> Path:
    return make_tiny_phi3(tmp_path_factory.mktemp("tiny-phi3"))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2 weights, converted once from the shipped GGUF into the toolchain cache."""
    from toolchain.config.sources import resolve

    return resolve("smollm2-135m").path


def finetune(model: str, recipe: str, out: Path, *, max_steps=None, method=None, data=None, evaluate: bool = True,
             launcher: str = "none", nproc: int = 2, zero: int = 2) -> dict:
    """The fine-tune stage as `toolchain finetune` calls it: the recipe loaded with its overrides, the model
    resolved, then the stage with those objects."""
    from toolchain.config.catalog import load_recipe
    from toolchain.config.schema import Launch
    from toolchain.config.sources import resolve
    from toolchain.stages.finetune.decoder import finetune as run

    rec, rec_file = load_recipe(recipe, max_steps=max_steps, method=method, data=data)
    return run(resolve(model), rec, rec_file, Path(out), evaluate=evaluate,
               launch=Launch(launcher=launcher, nproc=nproc, zero=zero))


def merge(model: str, adapter: Path, out: Path, merge_into=None) -> dict:
    """The merge stage as `toolchain merge` calls it: the base resolved, then the stage."""
    from toolchain.config.sources import resolve
    from toolchain.stages.merge import merge as run

    return run(resolve(model), Path(adapter), Path(out), merge_into=merge_into)


def prepare(model: str, recipe: str, out: Path):
    """pipeline.prepare as pipeline.edge calls it."""
    from toolchain import pipeline
    from toolchain.config.catalog import load_recipe
    from toolchain.config.sources import resolve

    rec, rec_file = load_recipe(recipe)
    return pipeline.prepare(resolve(model), rec, rec_file, Path(out))


def tiny_recipe_file(folder: Path, **overrides) -> Path:
    """chat-lora with a short schedule and a small eval, for fast tests; top-level keys can be overridden."""
    import yaml

    rec = yaml.safe_load((REPO / "recipes/chat-lora.yaml").read_text())
    data = REPO / "recipes/data/chat-lora"
    rec["data"].update(train=str(data / "train.jsonl"), eval=str(data / "eval.jsonl"))
    rec["train"].update(max_steps=4, batch_size=4, bf16="off")
    rec["metric"].update(eval_limit=8, batch_size=8)
    rec.update(overrides)
    rec["train"].setdefault("bf16", "off")  # the same fp32 run on every host; a test that wants bf16 says "on"
    p = folder / "chat-lora.yaml"  # the recipe's name stays chat-lora
    p.write_text(yaml.safe_dump(rec))
    return p


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    return tiny_recipe_file(tmp_path)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_phi3, tmp_path_factory):
    """One tiny Phi-3 cpu-int4 `edge` run (about a minute), shared by every test that needs a built artifact:
    (root folder, recipe file, the validation report with its headline)."""
    from toolchain import pipeline

    root = tmp_path_factory.mktemp("edge")
    rec = tiny_recipe_file(root, gates={})
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int4", out=root / "artifacts")
    return root, rec, rep


def make_tiny_bert(out: Path) -> Path:
    """A 2-layer random BERT (hidden 32) with all-MiniLM-L6-v2's WordPiece tokenizer: the encoder path in seconds."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from toolchain.config.sources import resolve

    minilm = resolve("minilm-l6").path
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(minilm / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def short_recipe_file(folder: Path, name: str, **sections) -> Path:
    """recipes/<name>.yaml with absolute data paths and the given sections updated (e.g. train={'max_steps': 2})."""
    import yaml

    rec = yaml.safe_load((REPO / f"recipes/{name}.yaml").read_text())
    for k in ("train", "eval"):
        if rec["data"].get(k):
            rec["data"][k] = str(REPO / "recipes" / rec["data"][k])
    for key, upd in sections.items():
        if isinstance(upd, dict) and isinstance(rec.get(key), dict):
            rec[key].update(upd)
        else:
            rec[key] = upd
    p = folder / f"{name}.yaml"
    p.write_text(yaml.safe_dump(rec))
    return p


# ------------------------------------------------------------------ another CPU: qemu user-mode emulation
QEMU = None
if __import__("platform").machine() == "x86_64":
    QEMU = __import__("shutil").which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (Debian: apt-get install qemu-user); "
                                "it runs Python with an AVX2-only CPUID to check artifacts hold on CPUs without VNNI")


def run_as_cpu(cpu: str, args: list, timeout: float = 600):
    """`python ARGS` (this interpreter, this checkout) on an emulated `cpu` (qemu -cpu: Haswell is AVX2+FMA, no
    AVX512, no VNNI), so ONNX Runtime picks that CPU's kernels. qemu's "TCG doesn't support" warnings go to stderr."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([QEMU, "-cpu", cpu, sys.executable, *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)
