"""Retention: the general set and its checkers, the min_retention gate, replay mixing, and a deliberately
over-trained run whose retention falls below the gate."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from toolchain.runtime import retention as rt
from toolchain.runtime.gates import check_gates

REPO = Path(__file__).resolve().parent.parent
GENERAL = REPO / "recipes/data/general"


def _items():
    return [json.loads(x) for x in (GENERAL / "retention.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("item, good, bad", [
    ({"kind": "fact", "prompt": "What is the capital of France?", "answers": ["Paris"]},
     "The capital of France is Paris.", "The capital of France is Lyon, not Parisian."),
    ({"kind": "fact", "prompt": "What gas?", "answers": ["carbon dioxide", "CO2"]}, "Mostly CO2.", "Oxygen."),
    ({"kind": "number", "prompt": "What is 2 + 3?", "answers": ["5"]}, "2 + 3 = 5.", "2 + 3 is 6, not 5."),
    ({"kind": "number", "prompt": "How many grams are in a kilogram?", "answers": ["1000"]},
     "There are 1,000 grams in a kilogram.", "A kilogram is heavy."),
    ({"kind": "word", "prompt": "Answer in one word: What color is grass?", "answers": ["green"]}, "Green.",
     "Grass is green."),
    ({"kind": "french", "prompt": "Reply in French: say thank you.", "answers": ["merci"]}, "Merci beaucoup !",
     "Thank you."),
    ({"kind": "list", "prompt": "List three colors.", "answers": ["red", "blue", "green", "yellow"]},
     "1. Red\n2. Blue\n3. Green", "Red, red and blue."),
])
def test_each_kind_of_answer_can_pass_and_fail(item, good, bad):
    assert rt.check(item, good)
    assert not rt.check(item, bad)


def test_an_empty_reply_and_an_unknown_kind():
    assert not any(rt.check({**it, "prompt": it["prompt"]}, "") for it in _items())
    with pytest.raises(ValueError, match="unknown kind 'essay'"):
        rt.check({"id": "x", "kind": "essay", "prompt": "p", "answers": ["a"]}, "a")


def test_score_by_kind():
    items = [{"kind": "fact", "prompt": "q", "answers": ["Paris"]}, {"kind": "number", "prompt": "q", "answers": ["7"]},
             {"kind": "number", "prompt": "q", "answers": ["8"]}]
    s = rt.score(items, ["Paris.", "7", "9"])
    assert s["retention"] == pytest.approx(2 / 3) and s["retention_items"] == 3
    assert s["retention_by_kind"] == {"fact": 1.0, "number": 0.5}
    with pytest.raises(ValueError):
        rt.score(items, ["Paris."])


def test_the_shipped_sets_are_consistent_and_disjoint():
    items = _items()
    assert 40 <= len(items) <= 64 and len({it["id"] for it in items}) == len(items)
    assert {it["kind"] for it in items} == set(rt.KINDS)
    assert all(rt.check(it, it["reference"]) for it in items)  # each reference answer passes its own checker
    replay = [json.loads(x)["prompt"] for x in (GENERAL / "replay.jsonl").read_text().splitlines()]
    assert len(replay) >= 64 and not {it["prompt"] for it in items} & set(replay)


def test_min_retention_is_a_fraction_of_the_base_torch_score():
    ref = {"torch_base": {"retention": 0.5}, "torch_tuned": {}}
    kept = check_gates({"min_retention": 0.9}, {"retention": 0.46}, ref, "exact_match")
    lost = check_gates({"min_retention": 0.9}, {"retention": 0.2}, ref, "exact_match")
    assert kept == [{"gate": "min_retention", "limit": 0.9, "value": pytest.approx(0.92), "passed": True}]
    assert lost[0]["passed"] is False and lost[0]["value"] == pytest.approx(0.4)
    assert check_gates({"min_retention": 0.9}, {"retention": 0.0}, {"torch_base": {"retention": 0.0}},
                       "exact_match")[0]["value"] == math.inf
    assert check_gates({"min_retention": 0.9}, {}, ref, "exact_match") == []  # not measured (an encoder): no gate


def test_recipe_keys_are_checked(tmp_path):
    from toolchain.config.catalog import open_recipe
    from toolchain.runtime.errors import ToolchainError

    rec = open_recipe("chat-lora").recipe
    # replay on by default, and a gate above the no-replay collapse (0.30 of the base, recipes/chat-lora.yaml)
    assert 0 < rec.data.replay.fraction < 1 and 0.3 < rec.gates.min_retention <= 1
    with pytest.raises(ToolchainError, match="data.replay.fraction"):
        open_recipe("chat-lora", sets=["data.replay.fraction=1"])
    with pytest.raises(ToolchainError, match="gates.min_retention"):
        open_recipe("chat-lora", sets=["gates.min_retention=0"])


def test_every_decoder_recipe_replays_and_gates_retention():
    """Keeping what the model knew is the default for every decoder recipe, not only chat-lora: replay on and
    min_retention at 0.9 (measured per recipe: bench/results/retention-recipes-2026-12-02.md)."""
    from toolchain.config.catalog import all_recipes, get_card

    decoders = {n: r for n, r in all_recipes().items() if get_card(r.model).kind == "decoder"}
    assert {"chat-lora", "chat-dora", "chat-qlora"} <= set(decoders)
    for name, rec in decoders.items():
        assert rec.data.replay.fraction > 0, name
        assert rec.gates.min_retention == 0.9, name


def test_replay_rows_are_mixed_in_as_the_fraction_of_training():
    from toolchain.hf.data import mix

    assert mix(list(range(6)), ["a", "b"], 0.25) == [0, 1, 2, 3, 4, 5, "a", "b"]
    assert mix(list(range(9)), ["a"], 0.25) == list(range(9)) + ["a"] * 3  # too few: repeated
    assert mix([1, 2], ["a"], 0.0) == [1, 2] and mix([1, 2], [], 0.5) == [1, 2]


def test_a_cut_answer_keeps_whole_sentences():
    from toolchain.stages.finetune.replay import whole_sentences

    assert whole_sentences("Paris is big. It has a river and") == "Paris is big."
    assert whole_sentences("Yes!") == "Yes!" and whole_sentences("it goes on and") == ""


def test_the_artifact_ships_the_retention_set_and_is_scored_on_it(tiny_artifact):
    """The tiny Phi-3 artifact: retention.jsonl is checked by the manifest; validate scores it, and the torch
    figures (base, tuned, drift) are recorded beside the task metric."""
    root, _, rep = tiny_artifact
    art = Path(rep["artifact"])
    man = json.loads((art / "manifest.json").read_text())
    assert rt.RETENTION_FILE in man["files"]
    shipped = [json.loads(x) for x in (art / rt.RETENTION_FILE).read_text().splitlines()]
    assert [r["id"] for r in shipped] == [it["id"] for it in _items()] and all(r["prompt_ids"] for r in shipped)
    assert rep["measured"]["retention_items"] == len(shipped) and 0 <= rep["measured"]["retention"] <= 1
    tuned = man["reference"]["torch_tuned"]
    assert {"retention", "drift_top1_agreement", "drift_mean_kl"} <= set(tuned)
    assert "retention" in man["reference"]["torch_base"] and "retention" in man["reference"]["torch_tuned"]
    assert "retention_artifact" in rep["headline"] and "retention" in (art / "report.md").read_text()


@pytest.mark.slow
def test_an_over_trained_run_misses_the_retention_gate(smollm2, tmp_path):
    """chat-lora on the real SmolLM2 at a learning rate far too high and with no replay: the booking format takes
    over every answer, and the min_retention gate (the same check validate applies) fails."""
    from conftest import finetune, short_recipe_file

    rec = short_recipe_file(tmp_path, "chat-lora", train={"max_steps": 30, "lr": 1.0e-2, "warmup_steps": 0, "bf16": "off"},
                            metric={"eval_limit": 8, "batch_size": 8})
    import yaml

    d = yaml.safe_load(rec.read_text())
    d["data"]["replay"] = {"fraction": 0.0}
    rec.write_text(yaml.safe_dump(d))
    res = finetune("smollm2-135m", str(rec), tmp_path / "ft")
    base, tuned = res["base"]["retention"], res["tuned"]["retention"]
    gates = check_gates({"min_retention": 0.9}, {"retention": tuned}, {"torch_base": {"retention": base}}, "exact_match")
    assert base > 0.3, base  # the base knows things
    assert gates[0]["gate"] == "min_retention" and not gates[0]["passed"], (base, tuned)
    assert res["tuned"]["drift_mean_kl"] > 0.5 and res["tuned"]["drift_top1_agreement"] < 0.9
