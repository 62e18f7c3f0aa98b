"""One base, many run-time LoRA adapters (`toolchain edge --adapters`): the tiny Phi-3 with two tiny recipes on
different data and seeds, built once for the module; the base alone against the plain base export, each adapter
against its recipe's merged model, switching, and the refusals (another base, a flipped byte, DML)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, short_recipe_file, tiny_recipe_file
from test_runtime_torch_free import BLOCK_TORCH
from toolchain.runtime import genai
from toolchain.runtime.errors import ToolchainError

NAMES = ("chat-lora", "classify")


def _recipes(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train = {"max_steps": 8, "batch_size": 4, "bf16": "off"}
    a = tiny_recipe_file(folder, train={**train, "lr": 2e-3, "warmup_steps": 1, "seed": 0}, gates={})
    b = short_recipe_file(folder, "classify", train={**train, "seed": 1}, metric={"eval_limit": 8},
                          data={"max_length": 320}, gates={"max_perplexity_increase_pct": 10})  # the tiny BPE is long
    return [a, b]


@pytest.fixture(scope="module")
def built(tiny_phi3, tmp_path_factory):
    from toolchain.pipeline_adapters import edge_adapters

    root = tmp_path_factory.mktemp("adapters")
    recipes = _recipes(root / "recipes")
    rep = edge_adapters(str(tiny_phi3), [str(r) for r in recipes], out=root / "artifacts")
    return root, recipes, rep, Path(rep["artifact"])


def _prompts(art: Path, name: str) -> list[list[int]]:
    rows = [json.loads(x) for x in (art / "adapters" / f"{name}.eval.jsonl").read_text().splitlines()]
    return [r["prompt_ids"] for r in rows if "prompt_ids" in r]


def _greedy(model, prompts, n=12) -> list[list[int]]:
    return [genai.generate(model, p, n).tokens for p in prompts]


def test_multi_adapter_artifact_builds_and_validates(built):
    root, _, rep, art = built
    assert art == root / "artifacts" / "tiny-phi30-adapters" / "cpu-int4"
    man = json.loads((art / "manifest.json").read_text())
    assert set(man["adapters"]) == set(NAMES) and man["target"]["precision"] == "int4"
    for name in NAMES:
        e = man["adapters"][name]
        assert e["file"] == f"adapters/{name}.onnx_adapter" and man["files"][e["file"]] == e["sha256"]
        assert e["eval"] in man["files"] and e["recipe"]["name"] == name and e["rank"] == 16
        assert e["base_weights"] == man["base"]["weights"] == man["inputs"]["weights"]
        assert {"torch_base", "torch_tuned", "onnx_fp32"} <= set(e["reference"])
        assert "perplexity" in e["reference"]["torch_tuned"] and "perplexity" in e["reference"]["onnx_fp32"]
    q = man["target"]["quantize"]
    assert q["matmulnbits"] > 0 and q["matmul_left_fp32"] == man["base"]["lora_inputs"]  # every LoRA MatMul float
    assert rep["validated"] and rep["status"] == "passed", rep.get("adapters")
    for name in NAMES:
        m = rep["adapters"][name]["measured"]
        assert m["perplexity"] > 1 and m["eval_examples"] == 8 and m["decode_tok_s_p50"] > 0
        assert m["token_agreement_fp32"] > 0  # against the fp32 base with the same adapter
        assert rep["base"][name]["perplexity"] > 1 and "torch_base" in rep["base"][name]
        # the base alone on the recipe's split is the untuned base: int4 noise away from torch's base perplexity
        assert abs(rep["base"][name]["delta_perplexity_vs_torch_base_pct"]) < 5
        # retention, as on every decoder artifact: the shipped set scored with each adapter and with the base alone
        assert m["retention_items"] == rep["base"][name]["retention_items"] == 48 and 0 <= m["retention"] <= 1
        assert "retention" in rep["adapters"][name]["reference"]["torch_base"]
    assert "retention.jsonl" in man["files"]
    h = rep["headline"]
    assert h["size_mb"] == pytest.approx(h["base_mb"] + sum(rep["measured"]["adapters_mb"].values()))
    assert h["size_mb"] < h["merged_equivalent_mb"]  # one base plus two adapters is less than two bases
    assert rep["switch"]["activate_ms_switched_p50"] < 50 and (art / "report.md").read_text().startswith("# cpu-int4")


def test_unchanged_recipes_reuse_every_stage(built, tiny_phi3, monkeypatch):
    from toolchain.pipeline_adapters import edge_adapters

    root, recipes, _, _ = built
    for mod, fn in [("toolchain.stages.finetune.decoder", "finetune"), ("toolchain.stages.adapters", "build_base"),
                    ("toolchain.stages.adapters", "convert"), ("toolchain.stages.quantize.nbits", "quantize")]:
        monkeypatch.setattr(f"{mod}.{fn}", lambda *a, **k: pytest.fail(f"{fn} ran again"))
    rep = edge_adapters(str(tiny_phi3), [str(r) for r in recipes], out=root / "artifacts")
    assert all(rep["headline"]["stages_reused"].values()) and len(rep["headline"]["stages_reused"]) == 3 + 3 * len(NAMES)


def test_base_alone_is_the_plain_base_export(built, tiny_phi3, tmp_path):
    """No adapter active: the same greedy tokens as the base exported and quantized the usual way, and at fp32 the
    same logits as the plain export."""
    from toolchain.config.catalog import load_recipe
    from toolchain.stages.export.decoder import export
    from toolchain.stages.quantize.nbits import quantize

    root, recipes, _, art = built
    export(tiny_phi3, tmp_path / "fp32")
    quantize(tmp_path / "fp32", "cpu-int4", tmp_path / "int4", load_recipe(str(recipes[0]))[0].quantize)  # as edge does
    prompts = _prompts(art, "chat-lora")[:4] + _prompts(art, "classify")[:4]
    plain, _ = genai.load(tmp_path / "int4")
    shared, _ = genai.load(art)
    assert _greedy(shared, prompts) == _greedy(plain, prompts)
    fp32_plain, _ = genai.load(tmp_path / "fp32")
    fp32_lora, _ = genai.load(root / "artifacts" / "tiny-phi30-adapters" / "stages" / "base-lora")
    assert _greedy(fp32_lora, prompts) == _greedy(fp32_plain, prompts)


def test_each_adapter_matches_its_merged_model(built, tiny_phi3, tmp_path):
    """fp32: the base with the .onnx_adapter gives the merged fp32 export's greedy tokens on the recipe's held-out
    prompts. int4: the adapter on the shared int4 base stays at least as close to them as the recipe's merged
    int4 model does (its delta is not quantized)."""
    from conftest import merge
    from toolchain.stages.export.decoder import export
    from toolchain.stages.quantize.nbits import quantize

    root, _, rep, art = built
    stages = root / "artifacts" / "tiny-phi30-adapters" / "stages"
    man = json.loads((art / "manifest.json").read_text())
    for name in NAMES:
        merge(str(tiny_phi3), stages / f"finetune-{name}" / "adapter", tmp_path / name / "merged")
        export(tmp_path / name / "merged", tmp_path / name / "fp32")
        quantize(tmp_path / name / "fp32", "cpu-int4", tmp_path / name / "int4")
        prompts = _prompts(art, name)
        merged32, _ = genai.load(tmp_path / name / "fp32")
        want = _greedy(merged32, prompts)
        with_adapter, _ = genai.load(stages / "base-lora", adapter=stages / f"adapter-{name}" / "adapter.onnx_adapter")
        assert _greedy(with_adapter, prompts) == want
        merged4, _ = genai.load(tmp_path / name / "int4")
        shared4, _ = genai.load(art, adapter=name)

        def agree(got):
            return np.mean([np.mean([a == b for a, b in zip(g, w)]) for g, w in zip(got, want)])

        assert agree(_greedy(shared4, prompts)) >= agree(_greedy(merged4, prompts)) - 0.1
        assert man["adapters"][name]["size_mb"] < 0.5 * rep["measured"]["base_mb"]


def test_switching_adapters_both_ways(built):
    """One base loaded once: chat-lora -> classify -> base -> chat-lora give each one's own tokens, as a fresh load
    with only that adapter does, and the adapters differ from each other and from the base."""
    from toolchain.runtime.adapters import open_artifact

    _, _, _, art = built
    prompts = _prompts(art, "chat-lora")[:3]
    model, _, _, load_ms = open_artifact(art)
    assert set(load_ms) == set(NAMES) and model.loaded == frozenset(NAMES)
    seen = {n: _greedy(model.use(n), prompts) for n in ("chat-lora", "classify", None)}
    again = {n: _greedy(model.use(n), prompts) for n in (None, "classify", "chat-lora")}
    assert seen == again
    for n in NAMES:
        alone, _ = genai.load(art, adapter=n)
        assert _greedy(alone, prompts) == seen[n]
    assert seen["chat-lora"] != seen["classify"] != seen[None] != seen["chat-lora"]
    with pytest.raises(ToolchainError, match="adapter 'qa' is not loaded"):
        model.use("qa")


def _copy(art: Path, dst: Path) -> Path:
    shutil.copytree(art, dst)
    (dst / "report.json").unlink(missing_ok=True)
    return dst


def test_flipped_byte_in_an_adapter_is_refused(built, tmp_path):
    from toolchain.runtime.adapters import open_artifact

    _, _, _, art = built
    copy = _copy(art, tmp_path / "copy")
    f = copy / "adapters" / "classify.onnx_adapter"
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    f.write_bytes(bytes(blob))
    with pytest.raises(ToolchainError, match=r"classify.onnx_adapter: sha256 differs from the manifest"):
        open_artifact(copy)
    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(copy), "--adapter", "chat-lora"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "classify.onnx_adapter: sha256 differs" in r.stderr and "Traceback" not in r.stderr
    # the manifest's file list patched to the flipped file's hash: the adapter's own entry still refuses it
    from toolchain.runtime.fsutil import sha256_file

    man = json.loads((copy / "manifest.json").read_text())
    man["files"]["adapters/classify.onnx_adapter"] = sha256_file(f)
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ToolchainError, match=r"classify.onnx_adapter: sha256 differs from the manifest"):
        open_artifact(copy, names=["classify"])


def test_adapter_trained_on_another_base_is_refused(built, tmp_path):
    """An adapter entry carried over from an artifact of other base weights (the file itself would load and run:
    the shapes are the same) is refused by the base weights' hash, and so is `adapters add` with another base."""
    from conftest import make_tiny_phi3
    from toolchain.pipeline_adapters import add_adapter, weights_hash
    from toolchain.config.sources import resolve
    from toolchain.runtime.adapters import open_artifact

    root, recipes, _, art = built
    other = tmp_path / "other-phi3"
    other.mkdir()
    make_tiny_phi3(other)
    st = other / "model.safetensors"
    from safetensors.numpy import load_file, save_file

    w = load_file(str(st))
    w["model.norm.weight"] = w["model.norm.weight"] * 1.5  # same architecture and shapes, other weights
    save_file(w, str(st), metadata={"format": "pt"})
    other_hash = weights_hash(resolve(str(other)))
    copy = _copy(art, tmp_path / "copy")
    man = json.loads((copy / "manifest.json").read_text())
    assert other_hash != man["base"]["weights"]
    man["adapters"]["classify"]["base_weights"] = other_hash
    (copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ToolchainError, match="adapter 'classify' was trained on other base weights"):
        open_artifact(copy)
    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(copy)], capture_output=True, text=True)
    assert r.returncode == 2 and "trained on other base weights" in r.stderr
    with pytest.raises(ToolchainError, match="an adapter trained on another base"):
        add_adapter(art, str(recipes[0]), model=str(other))


def test_validate_one_adapter_on_device_without_torch(built, tmp_path):
    _, _, _, art = built
    copy = _copy(art, tmp_path / "device")
    code = BLOCK_TORCH + ("import sys; from toolchain.cli import main; "
                          "sys.argv = ['toolchain', 'validate', *sys.argv[1:], '--json']; main()")
    r = subprocess.run([sys.executable, "-c", code, str(copy), "--adapter", "classify"], capture_output=True, text=True,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert list(out["adapters"]) == ["classify"] and list(out["base"]) == ["classify"] and out["passed"]
    assert out["switch"]["adapters"] == 1
    r = subprocess.run([sys.executable, "-c", code, str(copy), "--adapter", "qa"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "no adapter 'qa'; this artifact has chat-lora, classify" in r.stderr


def test_refused_before_any_work(tiny_phi3, tmp_path, monkeypatch):
    """DML does not run adapters in onnxruntime-genai: refused, not built broken; so are a QDQ target, fp32 adapters
    for an fp16 (CUDA) base, methods that are not a plain LoRA, and the same recipe twice. Nothing is trained."""
    from toolchain.pipeline_adapters import edge_adapters

    monkeypatch.setattr("toolchain.stages.finetune.decoder.finetune", lambda *a, **k: pytest.fail("trained"))
    rec = tiny_recipe_file(tmp_path)
    with pytest.raises(ToolchainError, match="dml-int4: not supported: onnxruntime-genai does not run LoRA adapters"):
        edge_adapters(str(tiny_phi3), [str(rec)], target="dml-int4", out=tmp_path / "a")
    with pytest.raises(ToolchainError, match="cuda-int4: the base computes in fp16 on cuda, so do its adapters"):
        edge_adapters(str(tiny_phi3), [str(rec)], target="cuda-int4", out=tmp_path / "a", adapter_dtype="fp32")
    with pytest.raises(ToolchainError, match="npu-qdq: not supported: a static QDQ graph"):
        edge_adapters(str(tiny_phi3), [str(rec)], target="npu-qdq", out=tmp_path / "a")
    (tmp_path / "d").mkdir()
    dora = tiny_recipe_file(tmp_path / "d", method={"type": "dora", "r": 4, "alpha": 8})
    with pytest.raises(ToolchainError, match="method 'dora' cannot be a run-time adapter"):
        edge_adapters(str(tiny_phi3), [str(dora)], out=tmp_path / "a")
    with pytest.raises(ToolchainError, match="both recipe 'chat-lora'"):
        edge_adapters(str(tiny_phi3), [str(rec), str(rec)], out=tmp_path / "a")
    r = subprocess.run([sys.executable, "-m", "toolchain", "edge", "--model", str(tiny_phi3), "--adapters", str(rec),
                        "--target", "dml-int4", "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert r.returncode == 2 and "not supported" in r.stderr and "Traceback" not in r.stderr


def test_lora_parameters_are_the_builders_own(built, tiny_phi3, tmp_path):
    """The weights convert() writes are exactly those onnxruntime-genai's builder bakes in with `adapter_path` (same
    names, the B scaled by alpha/r, Phi-3's qkv_proj and gate_up_proj split)."""
    import onnx
    from onnx import numpy_helper

    from toolchain.stages.adapters import lora_inputs, lora_parameters
    from toolchain.stages.export.decoder import export_genai

    root, _, _, _ = built
    stages = root / "artifacts" / "tiny-phi30-adapters" / "stages"
    adapter = stages / "finetune-classify" / "adapter"
    export_genai(tiny_phi3, tmp_path / "baked", "fp32", tmp_path, False, options=(f"adapter_path={adapter}",))
    baked = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "baked" / "model.onnx")).graph.initializer
             if ".lora_" in i.name}
    mine, _ = lora_parameters(adapter, lora_inputs(stages / "base-lora" / "model.onnx"))
    assert set(mine) == set(baked) and len(mine) == 2 * 7 * 2  # 2 layers x (q, k, v, o, gate, up, down) x (A, B)
    for k, v in baked.items():
        np.testing.assert_allclose(mine[k], v, rtol=0, atol=1e-7)


def test_adapters_add_one_more_without_rebuilding_the_base(built, tmp_path, monkeypatch):
    """`toolchain adapters add`: a third recipe trained, converted and validated against the existing artifact (a
    copy of its run folder here); the shipped base's files are the same bytes, nothing is quantized again."""
    from toolchain.pipeline_adapters import add_adapter
    from toolchain.runtime.adapters import validate

    root, _, _, art = built
    run = shutil.copytree(art.parent, tmp_path / "tiny-phi30-adapters")
    copy = run / "cpu-int4"
    before = json.loads((copy / "manifest.json").read_text())["files"]
    (tmp_path / "r").mkdir()
    third = tiny_recipe_file(tmp_path / "r", name="chat-b", train={"max_steps": 8, "batch_size": 4, "bf16": "off",
                                                                   "seed": 2, "lr": 3e-3, "warmup_steps": 1}, gates={})
    monkeypatch.setattr("toolchain.stages.quantize.nbits.quantize", lambda *a, **k: pytest.fail("base quantized again"))
    monkeypatch.setattr("toolchain.stages.adapters.build_base", lambda *a, **k: pytest.fail("fp32 base rebuilt"))
    rep = add_adapter(copy, str(third))
    assert rep["headline"]["stages_reused"] == {"base-lora": True, "finetune-chat-b": False, "adapter-chat-b": False,
                                                "reference-chat-b": False}
    man = json.loads((copy / "manifest.json").read_text())
    assert set(man["adapters"]) == {*NAMES, "chat-b"} and man["adapters"]["chat-b"]["base_weights"] == man["base"]["weights"]
    assert {k: v for k, v in man["files"].items() if k in before} == before  # base and the first adapters untouched
    assert list(rep["adapters"]) == ["chat-b"] and rep["passed"]  # validated: the new adapter (and the base beside it)
    assert not (run / "stages" / ".keys" / "cpu-int4.json").exists()  # the next `edge --adapters` repackages
    full = validate(copy)
    assert set(full["adapters"]) == {*NAMES, "chat-b"} and full["passed"] and full["switch"]["adapters"] == 3
    r = subprocess.run([sys.executable, "-m", "toolchain", "adapters", "add", str(copy), "--recipe", str(third)],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "already has adapter 'chat-b'" in r.stderr


def test_fp16_adapters_beside_fp32(built, tiny_phi3):
    """--adapter-precision fp16: stages and an artifact folder of their own beside the fp32 ones, the fine-tunes
    reused; half the adapter bytes, and the same greedy tokens as the fp32 adapters on the same int4 base."""
    from toolchain.pipeline_adapters import edge_adapters

    root, recipes, rep32, art32 = built
    rep = edge_adapters(str(tiny_phi3), [str(r) for r in recipes], out=root / "artifacts", adapter_dtype="fp16")
    art = Path(rep["artifact"])
    assert art.name == "cpu-int4-fp16" and rep["passed"]
    assert all(rep["headline"]["stages_reused"][f"finetune-{n}"] for n in NAMES)
    man = json.loads((art / "manifest.json").read_text())
    assert man["base"]["adapter_dtype"] == "fp16" and all(e["dtype"] == "fp16" for e in man["adapters"].values())
    for n in NAMES:
        assert rep["measured"]["adapters_mb"][n] < 0.6 * rep32["measured"]["adapters_mb"][n]
        prompts = _prompts(art, n)
        assert _greedy(genai.load(art, adapter=n)[0], prompts) == _greedy(genai.load(art32, adapter=n)[0], prompts)
        ppl16, ppl32 = (r["adapters"][n]["measured"]["perplexity"] for r in (rep, rep32))
        assert ppl16 == pytest.approx(ppl32, rel=1e-3)
    from toolchain.report import scenario_rows, scenario_table

    table = scenario_table(scenario_rows(root / "artifacts"))
    assert table.count("chat-lora (adapter)") == 2 and "cpu-int4 shared base" in table


def test_cuda_int4_adapters_build_and_their_graph_runs_on_cpu(built, tiny_phi3, tmp_path):
    """A builder target: the base built by onnxruntime-genai's builder for CUDA at int4 with its LoRA MatMuls kept
    fp16 (int4_nodes_to_exclude) and fed by fp16 inputs. Not validated here (no CUDA EP: exit 3), but the same graph
    runs on the CPU EP: with no adapter it gives the plain cuda-int4 build's tokens, with an adapter the tokens of a
    cuda-int4 build with that adapter baked in by the builder."""
    from toolchain.pipeline_adapters import edge_adapters
    from toolchain.stages.adapters import lora_inputs, lora_matmuls
    from toolchain.stages.export.decoder import export_genai
    from toolchain.stages.quantize.builder import BUILDER_OPTIONS, build

    root, recipes, _, _ = built
    rep = edge_adapters(str(tiny_phi3), [str(r) for r in recipes], target="cuda-int4", out=root / "artifacts")
    art = Path(rep["artifact"])
    assert rep["status"] == "not_validated" and "CUDAExecutionProvider unavailable" in rep["reason"]
    assert all(rep["headline"]["stages_reused"][f"finetune-{n}"] for n in NAMES)
    man = json.loads((art / "manifest.json").read_text())
    assert man["target"]["provider_options"] == {"enable_cuda_graph": "0"} and man["base"]["adapter_dtype"] == "fp16"
    ins = lora_inputs(art / "model.onnx")
    assert len(ins) == 28 and {v["dtype"] for v in ins.values()} == {"float16"} and len(lora_matmuls(art / "model.onnx")) == 28
    assert man["target"]["quantize"]["ops"]["MatMulNBits"] > 0
    r = subprocess.run([sys.executable, "-m", "toolchain", "validate", str(art)], capture_output=True, text=True)
    assert r.returncode == 3 and "not validated on this host" in r.stderr
    prompts = _prompts(art, "classify")[:4]
    build(tiny_phi3, "cuda-int4", tmp_path / "plain")
    assert _greedy(genai.load(art)[0], prompts) == _greedy(genai.load(tmp_path / "plain")[0], prompts)
    adapter = root / "artifacts" / "tiny-phi30-adapters" / "stages" / "finetune-classify" / "adapter"
    exclude = ",".join(lora_matmuls(art / "model.onnx"))
    export_genai(tiny_phi3, tmp_path / "baked", "int4", tmp_path, False, "cuda",
                 BUILDER_OPTIONS["int4"] + (f"adapter_path={adapter}", f"int4_nodes_to_exclude={exclude}"))
    assert _greedy(genai.load(art, adapter="classify")[0], prompts) == _greedy(genai.load(tmp_path / "baked")[0], prompts)


def test_chat_and_generate_with_an_adapter(built, tmp_path):
    """`toolchain chat/generate --adapter NAME` answer with that adapter's tokens (as genai.load(adapter=NAME) does),
    /adapter switches mid-conversation, and an unknown name, a plain artifact or a flipped byte is a clear error;
    torch is never imported."""
    from toolchain.runtime.chat import Chat

    _, _, _, art = built
    prompt = "Book 2 seats in Oslo for 3 May. Name: Ana Lee."
    c = Chat(art, adapter="classify")
    want = {}
    for n in (*NAMES, None):
        alone, _ = genai.load(art, adapter=n) if n else genai.load(art)
        want[n] = genai.generate(alone, c.prompt_ids(prompt), 12, eos=c.eos).tokens
    assert c.adapters == sorted(NAMES) and c.adapter == "classify"
    assert c.ask(prompt, 12).tokens == [t for t in want["classify"] if t not in c.eos]
    c.reset()
    c.use("chat-lora")
    assert c.ask(prompt, 12).tokens == [t for t in want["chat-lora"] if t not in c.eos]
    with pytest.raises(ToolchainError, match="adapter 'qa' is not loaded; loaded: chat-lora, classify"):
        c.use("qa")
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "from toolchain.cli import main; main()", "chat", str(art),
                        "--adapter", "chat-lora", "--max-new-tokens", "12"],
                       input=f"{prompt}\n/adapter none\n/reset\n{prompt}\n/adapter qa\n", capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "(adapter: none, the base alone; loaded: chat-lora, classify)" in r.stderr
    assert "adapter 'qa' is not loaded" in r.stderr and r.stderr.count("tokens, ") == 2
    gen = subprocess.run([sys.executable, "-m", "toolchain", "generate", str(art), "-p", prompt, "--adapter", "classify",
                          "--max-new-tokens", "12", "--json"], capture_output=True, text=True, cwd=REPO)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["tokens"] == [t for t in want["classify"] if t not in c.eos]
    bad = _copy(art, tmp_path / "flipped")
    f = bad / "adapters" / "classify.onnx_adapter"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ToolchainError, match="sha256 differs from the manifest"):
        Chat(bad, adapter="chat-lora")


def test_edge_recipe_takes_the_adapter_runs_finetune(built, tiny_phi3, monkeypatch):
    """`edge --recipe R` after `edge --adapters R,...` trains R once: both key the fine-tune alike (pipeline.
    finetune_inputs), and the second run takes the first's stage folder instead of training again."""
    from conftest import prepare

    root, recipes, _, _ = built
    monkeypatch.setattr("toolchain.stages.finetune.decoder.finetune", lambda *a, **k: pytest.fail("trained again"))
    run = prepare(str(tiny_phi3), str(recipes[0]), root / "artifacts")
    mine = run.root / "stages" / "finetune" / "adapter" / "adapter_model.safetensors"
    theirs = root / "artifacts" / "tiny-phi30-adapters" / "stages" / "finetune-chat-lora" / "adapter" / mine.name
    assert run.st.reused["finetune"] and mine.read_bytes() == theirs.read_bytes()
    assert run.reference["torch_tuned"]["perplexity"] > 1  # the summary (base and tuned figures) came with it


def test_decoding_no_tokens_is_empty_not_a_crash(built):
    """onnxruntime-genai 0.15.2's Tokenizer.decode([]) kills the process with SIGFPE; an answer that is only its
    end-of-sequence token (retention under an adapter on the tiny model) must score as "", not end the run."""
    art = built[3]
    code = ("from toolchain.runtime import genai\n"
            f"m, tok = genai.load({str(art)!r})\n"
            "print(repr(genai.decode(tok, [])), repr(genai.decode(tok, [int(tok.encode('hi')[0])])) != \"''\")")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["''", "True"], r.stderr[-2000:]
