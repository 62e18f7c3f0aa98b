"""The scenario metrics on hand-made cases, and against the reference libraries where they are installed."""
from __future__ import annotations

import pytest

from toolchain.runtime import metrics as m

HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]


def test_bleu_and_chrf_known_values():
    assert m.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert m.chrf(["the cat sat on the mat"], [" the cat sat on the mat "]) == pytest.approx(100)
    assert m.chrf(["xyz"], ["abc"]) == 0 and m.bleu(["xyz qrs"], ["abc def"]) == 0
    # sacreBLEU's README sentences with one reference stream (values from sacrebleu 2.x defaults)
    assert m.bleu(HYPS, REFS) == pytest.approx(45.0675, abs=1e-3)
    assert m.chrf(HYPS, REFS) == pytest.approx(50.0431, abs=1e-3)
    assert m.chrf(["Los gatos compran la casa."], ["Los gatos compran la casa roja."]) > m.chrf(
        ["The cats buy the house."], ["Los gatos compran la casa roja."])


def test_token_f1_and_squad_em():
    assert m.token_f1(["the Kessa"], ["Kessa"]) == 1.0  # articles and case do not count
    assert m.token_f1(["Edith Crane"], ["Edith Crane Smith"]) == pytest.approx(0.8)  # p=1, r=2/3
    assert m.token_f1(["nothing"], ["Edith"]) == 0.0
    assert m.squad_exact_match(["The Avel."], ["the avel"]) == 1.0 and m.squad_exact_match(["Avel river"], ["Avel"]) == 0


def test_accuracy_and_macro_f1():
    refs = ["a", "a", "b", "c"]
    preds = ["a", "b", "b", "garbage"]
    assert m.accuracy(preds, refs) == 0.5
    # a: p=1 r=.5 f=2/3; b: p=.5 r=1 f=2/3; c: 0 -- 'garbage' is no class of its own
    assert m.macro_f1(preds, refs) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        m.accuracy(["a"], ["a", "b"])


ENTITY_CASES = [  # (predicted, reference, entity F1)
    ([["B-PER", "O", "O", "B-LOC"]], [["B-PER", "I-PER", "O", "B-LOC"]], 0.5),  # span cut short: half right
    ([["B-ORG", "I-ORG"]], [["B-PER", "I-PER"]], 0.0),  # right span, wrong type
    ([["I-PER", "I-PER"]], [["B-PER", "I-PER"]], 1.0),  # an I- that opens a chunk counts (seqeval default mode)
    ([["B-PER", "B-PER"]], [["B-PER", "I-PER"]], 0.0),  # two one-word entities are not one two-word entity
    ([["B-PER", "I-LOC"]], [["B-PER", "B-LOC"]], 1.0),  # a type change starts a new chunk
    ([["O", "O"], ["B-DATE", "I-DATE", "O"]], [["O", "O"], ["B-DATE", "I-DATE", "O"]], 1.0),
    ([["O"]], [["O"]], 0.0),  # nothing to find: F1 is 0, as in seqeval
]


@pytest.mark.parametrize("pred,ref,f1", ENTITY_CASES)
def test_entity_f1_edge_cases(pred, ref, f1):
    assert m.entity_scores(pred, ref)["entity_f1"] == pytest.approx(f1)


def test_entity_f1_matches_seqeval():
    seqeval = pytest.importorskip("seqeval.metrics")
    import warnings

    for pred, ref, _ in ENTITY_CASES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert m.entity_scores(pred, ref)["entity_f1"] == pytest.approx(seqeval.f1_score(ref, pred))
    with pytest.raises(ValueError, match="sentence 0"):
        m.entity_scores([["O"]], [["O", "O"]])


def test_constraints_parse_and_check():
    instr = ('Write a slogan for a tea. Use between 5 and 8 words. Use the words "calm" and "golden". '
             'End with an exclamation mark. Start with the word "Calm".')
    c = m.parse_constraints(instr)
    assert c == {"min_words": 5, "max_words": 8, "must_include": ["calm", "golden"], "end_with": "!", "start_with": "Calm"}
    assert m.satisfies("Calm mornings need a golden tea!", c)
    assert not m.satisfies("Calm mornings need a golden tea.", c)  # wrong end mark
    assert not m.satisfies("Calm mornings need a tea!", c)  # a required word missing
    assert not m.satisfies("Calm golden!", c)  # too short
    assert not m.satisfies("Golden calm mornings need tea!", c)  # wrong first word
    assert m.constraint_rate(["Calm mornings need a golden tea!", "no"], [c, c]) == 0.5
    with pytest.raises(ValueError, match="no constraints"):
        m.constraint_rate(["x"], [{}])


def test_task_scores_families():
    assert set(m.task_scores("accuracy", ["a"], ["a"])) == {"accuracy", "macro_f1"}
    assert set(m.task_scores("chrf", ["a b"], ["a b"])) == {"chrf", "bleu"}
    assert set(m.task_scores("entity_f1", [["B-X"]], [["B-X"]])) == {"entity_f1", "entity_precision", "entity_recall"}
    with pytest.raises(ValueError, match="unknown metric"):
        m.task_scores("rouge", ["a"], ["a"])
