"""The seed scenarios: every recipe and its data, each decoder recipe through finetune on the tiny Phi-3, the
encoder path (classify-encoder, ner) end to end on a tiny random BERT, validated with torch blocked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, needs_qemu, run_as_cpu, short_recipe_file
from test_catalog_cli import run_cli
from test_runtime_torch_free import BLOCK_TORCH
from toolchain.config import catalog
from toolchain import pipeline
from toolchain.hf.data import read_jsonl
from toolchain.runtime.errors import ToolchainError
from toolchain.runtime import encoder as rt
from toolchain.runtime import metrics

SCENARIOS = {"domain-adapt": "perplexity", "classify": "accuracy", "classify-encoder": "accuracy", "ner": "entity_f1",
             "translate": "chrf", "qa": "token_f1", "chat-lora": "exact_match", "creative": "constraint_rate"}
DECODER = ["domain-adapt", "classify", "translate", "qa", "creative"]  # chat-lora: test_edge.py


def test_recipes_lists_the_seven_scenarios_with_their_metric():
    r = run_cli("recipes", "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in json.loads(r.stdout)}
    assert {n: rows[n]["metric"] for n in SCENARIOS} == SCENARIOS
    assert {x["task"] for x in rows.values()} >= {"domain", "classify", "ner", "translate", "qa", "chat", "creative"}
    assert rows["ner"]["model"] == rows["classify-encoder"]["model"] == "minilm-l6"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_recipe_data_loads_with_origin_licence_and_a_held_out_split(name):
    rec, f = catalog.load_recipe(name)
    assert rec.data.origin and rec.data.license and rec.data.eval
    encoder = catalog.get_card(rec.model).kind == "encoder"
    load = (lambda p: rt.read_rows(p, rec.task)) if encoder else (lambda p: [r.model_dump() for r in read_jsonl(p)])
    train, held = load(f.parent / rec.data.train), load(f.parent / rec.data.eval)
    assert len(train) >= 400 and len(held) >= 48
    key = (lambda r: json.dumps(r["messages"][:-1]) if "messages" in r else json.dumps(r, sort_keys=True))
    assert not {key(r) for r in held} & {key(r) for r in train}, "an eval input also occurs in train"


def test_creative_references_meet_their_own_constraints():
    for split in ("train", "eval"):
        rows = read_jsonl(REPO / f"recipes/data/creative/{split}.jsonl")
        assert all(metrics.satisfies(r.messages[-1].content, metrics.parse_constraints(r.messages[0].content))
                   for r in rows)


def test_generated_data_is_reproducible(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "recipes/data"))
    import make_scenarios

    monkeypatch.setattr(make_scenarios, "OUT", tmp_path)
    for fn in (make_scenarios.classify, make_scenarios.ner, make_scenarios.translate, make_scenarios.qa,
               make_scenarios.creative):
        fn()
    for p in tmp_path.rglob("*.jsonl"):
        assert p.read_text() == (REPO / "recipes/data" / p.relative_to(tmp_path)).read_text(), p


@pytest.mark.parametrize("name", DECODER)
def test_decoder_recipe_finetunes_and_scores(name, tiny_phi3, tmp_path):
    """A couple of steps on the tiny Phi-3: base and tuned get every figure of the recipe's metric family."""
    from conftest import finetune

    rec = short_recipe_file(tmp_path, name, train={"max_steps": 2, "batch_size": 2}, data={"max_length": 400},
                            metric={"eval_limit": 4, "max_new_tokens": 6, "batch_size": 4})
    res = finetune(str(tiny_phi3), str(rec), tmp_path / "ft")
    want = metrics.FAMILIES[SCENARIOS[name]] or ["perplexity"]
    for who in ("base", "tuned"):
        assert set(want) <= set(res[who]) and res[who]["perplexity"] > 1
    if name != "domain-adapt":
        assert res["tuned"]["eval_examples"] == 4
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()


def test_creative_edge_scores_constraints_on_device(tiny_phi3, tmp_path):
    """The device re-checks the creative constraints from eval.jsonl, with no access to the prompts' text."""
    rec = short_recipe_file(tmp_path, "creative", train={"max_steps": 2, "batch_size": 2}, gates={}, data={"max_length": 400},
                            metric={"eval_limit": 3, "max_new_tokens": 6, "batch_size": 4})
    rep = pipeline.edge(str(tiny_phi3), str(rec), target="cpu-int4", out=tmp_path / "art")
    art = Path(rep["headline"]["artifact"])
    rows = [json.loads(x) for x in (art / "eval.jsonl").read_text().splitlines()]
    assert [bool(r.get("constraints")) for r in rows[:4]] == [True, True, True, False]
    assert rep["metric"] == "constraint_rate" and 0 <= rep["measured"]["constraint_rate"] <= 1
    assert "constraint_rate" in (art / "report.md").read_text()


# ---------------------------------------------------------------------------------------------------- encoder
def _encoder_run(tiny_bert, root: Path, name: str, target: str) -> dict:
    rec = short_recipe_file(root, name, train={"max_steps": 3, "batch_size": 8}, metric={"eval_limit": 24},
                            gates={"max_latency_ms_p95": 1e6})
    return pipeline.edge(str(tiny_bert), str(rec), target=target, out=root / "art")


@pytest.fixture(scope="module")
def encoder_runs(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    return {("classify-encoder", t): _encoder_run(tiny_bert, root, "classify-encoder", t) for t in ("cpu-int8", "cpu-fp32")} | {
        ("ner", "cpu-int8"): _encoder_run(tiny_bert, root, "ner", "cpu-int8")}


def test_encoder_artifact_is_onnx_tokenizer_and_manifest(encoder_runs):
    for (name, target), rep in encoder_runs.items():
        art = Path(rep["headline"]["artifact"])
        man = json.loads((art / "manifest.json").read_text())
        assert set(man["files"]) == {"model.onnx", "tokenizer.json", "eval.jsonl"}, "no GenAI folder for encoders"
        assert man["target"]["name"] == target and man["encoder"]["task"] == ("ner" if name == "ner" else "classify")
        assert [s["stage"] for s in man["lineage"]] == ["finetune", "export-optimum", "reference", f"quantize-{target}"]
        m = rep["measured"]
        assert 0 < m["latency_ms_p50"] <= m["latency_ms_p95"] and rep["passed"]
        assert set(metrics.FAMILIES[man["recipe"]["metric"]["name"]]) <= set(m)
        assert "torch tuned" in (art / "report.md").read_text()


def test_encoder_fp32_artifact_scores_like_torch(encoder_runs):
    """Same tokenizer code, same decoding: the fp32 ONNX artifact reproduces the tuned torch figures."""
    rep = encoder_runs[("classify-encoder", "cpu-fp32")]
    ref = rep["reference"]
    assert rep["measured"]["accuracy"] == pytest.approx(ref["torch_tuned"]["accuracy"])
    assert ref["onnx_fp32"]["macro_f1"] == pytest.approx(ref["torch_tuned"]["macro_f1"])
    int8 = encoder_runs[("classify-encoder", "cpu-int8")]["headline"]
    assert int8["size_mb"] < int8["fp32_size_mb"] / 2


def test_encoder_validate_is_torch_free_and_enforces_gates(encoder_runs, tmp_path):
    import shutil

    art = tmp_path / "device"
    shutil.copytree(encoder_runs[("ner", "cpu-int8")]["headline"]["artifact"], art)
    code = BLOCK_TORCH + "import sys; from toolchain.cli import main; sys.argv = ['toolchain', 'validate', sys.argv[1], '--json']; main()"
    r = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert out["kind"] == "encoder" and 0 <= out["measured"]["entity_f1"] <= 1 and out["measured"]["eval_examples"] == 24
    man = json.loads((art / "manifest.json").read_text())
    man["recipe"]["gates"] = {"max_latency_ms_p95": 1e-6}
    (art / "manifest.json").write_text(json.dumps(man))
    r = subprocess.run([sys.executable, "-c", code, str(art)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "gate(s) missed: max_latency_ms_p95" in r.stderr
    # the user's own NER data, tokenized on the device
    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"tokens": ["Ana", "lives", "in", "Oslo"], "tags": ["B-PER", "O", "O", "B-LOC"]}) + "\n")
    r = subprocess.run([sys.executable, "-c", code.replace("'--json'", "'--json', '--data', sys.argv[2]"), str(art),
                        str(mine)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr and '"eval_examples": 1' in r.stdout


@needs_qemu
def test_encoder_int8_holds_on_a_cpu_without_vnni(encoder_runs, tmp_path):
    """The ner cpu-int8 artifact built here, validated as a device would under an emulated Haswell (AVX2, no
    AVX512, no VNNI): the gates pass with the native figure (full-range per-channel int8 scored 0.957 against the
    0.97 gate there, the CI failure on AVX2 machines), and the report says what the host lacks. ~15 s: the
    artifact is the module's, the emulated validation is this test's cost."""
    import shutil

    native = encoder_runs[("ner", "cpu-int8")]
    art = tmp_path / "device"
    shutil.copytree(native["headline"]["artifact"], art)
    r = run_as_cpu("Haswell", ["-m", "toolchain", "validate", art, "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert out["passed"] and out["host"]["vnni"] is False and "avx512f" not in out["host"]["isa"]
    assert out["measured"]["entity_f1"] == pytest.approx(native["measured"]["entity_f1"], rel=1e-6)
    assert "no VNNI" in out["note"] and "7-bit weights keep them exact" in out["note"]


def test_encoder_refuses_a_decoder_target(tiny_bert, tmp_path):
    rec = short_recipe_file(tmp_path, "ner")
    with pytest.raises(ToolchainError, match="target 'cpu-int4' is not built for encoders; use cpu-int8 or cpu-fp32"):
        pipeline.edge(str(tiny_bert), str(rec), target="cpu-int4", out=tmp_path / "art")


def test_encoder_rows_are_validated_with_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["a", "b"], "tags": ["O"]}\n')
    with pytest.raises(ToolchainError, match=r"bad.jsonl:2: 'tokens' and 'tags' must be non-empty lists of the same length"):
        rt.read_rows(p, "ner")
    p.write_text('{"text": "hi"}\n')
    with pytest.raises(ToolchainError, match=r"bad.jsonl:1: a classify row needs exactly the keys \['text', 'label'\]"):
        rt.read_rows(p, "classify")


def test_scenarios_table_reads_every_report(encoder_runs):
    out = Path(encoder_runs[("ner", "cpu-int8")]["headline"]["artifact"]).parent.parent
    r = run_cli("scenarios", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [x for x in r.stdout.splitlines() if x.startswith("| ") and "---" not in x][1:]
    assert sorted(x.split(" | ")[0][2:] + "/" + x.split(" | ")[2] for x in rows) == [
        "classify-encoder/cpu-fp32", "classify-encoder/cpu-int8", "ner/cpu-int8"]
    assert all("ms/seq p50" in x for x in rows)


def test_ner_on_a_decoder_is_refused_with_the_fix(tiny_phi3, tmp_path):
    rec = short_recipe_file(tmp_path, "ner")
    with pytest.raises(ToolchainError, match="runs on an encoder.*--model minilm-l6"):
        pipeline.edge(str(tiny_phi3), str(rec), out=tmp_path / "art")
