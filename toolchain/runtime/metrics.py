"""Task metrics shared by the torch side (reference numbers) and the device side (ORT validation). No torch."""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references) or not references:
        raise ValueError("exact_match needs equal, non-empty lists")
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per scored token."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / n_tokens)


# ------------------------------------------------------------------------------------------------ scenario metrics
# Each is a pure function of predictions and references, so the torch side (reference figures) and the device
# side (ONNX Runtime) score outputs identically. Scales: fractions in [0, 1], except chrF and BLEU in [0, 100]
# (sacreBLEU's convention).


def _norm_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean SQuAD token-overlap F1 between each prediction and its reference answer."""
    _check(predictions, references)
    total = 0.0
    for p, r in zip(predictions, references):
        pt, rt = _norm_answer(p).split(), _norm_answer(r).split()
        if not pt or not rt:
            total += float(pt == rt)
            continue
        common = sum((Counter(pt) & Counter(rt)).values())
        if common:
            prec, rec = common / len(pt), common / len(rt)
            total += 2 * prec * rec / (prec + rec)
    return total / len(references)


def squad_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Exact match after SQuAD normalisation (case, punctuation and articles ignored)."""
    _check(predictions, references)
    return sum(_norm_answer(p) == _norm_answer(r) for p, r in zip(predictions, references)) / len(references)


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predicted labels equal to the reference label (surrounding whitespace ignored)."""
    return exact_match(predictions, references)


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in the references (sklearn's `labels=` set):
    a generated string that is no label counts against its reference class, without adding a class of its own."""
    _check(predictions, references)
    preds, refs = [p.strip() for p in predictions], [r.strip() for r in references]
    f1s = []
    for c in sorted(set(refs)):
        tp = sum(p == c and r == c for p, r in zip(preds, refs))
        fp = sum(p == c and r != c for p, r in zip(preds, refs))
        fn = sum(p != c and r == c for p, r in zip(preds, refs))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (character 6-grams, beta 2) from sacreBLEU, 0-100."""
    from sacrebleu.metrics import CHRF

    _check(predictions, references)
    return CHRF().corpus_score([p.strip() for p in predictions], [[r.strip() for r in references]]).score


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacreBLEU defaults: 13a tokenisation, exponential smoothing), 0-100."""
    from sacrebleu.metrics import BLEU

    _check(predictions, references)
    return BLEU().corpus_score([p.strip() for p in predictions], [[r.strip() for r in references]]).score


def _entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """(type, start, end) chunks of an IOB2/IOB1 tag sequence, the way seqeval's default (non-strict) mode reads
    them: an I- tag that does not continue a chunk of its type starts a new one."""
    out, start, typ = set(), None, None
    for i, t in enumerate(list(tags) + ["O"]):
        prefix, _, kind = t.partition("-") if t != "O" else ("O", "", "")
        ends = typ is not None and (prefix in ("O", "B") or kind != typ)
        if ends:
            out.add((typ, start, i - 1))
            typ = None
        if prefix in ("B", "I") and typ is None:
            start, typ = i, kind
    return out


def entity_scores(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro precision, recall and F1 over all sentences (seqeval's default `f1_score`)."""
    _check(predictions, references)
    tp = n_pred = n_ref = 0
    for k, (p, r) in enumerate(zip(predictions, references)):
        if len(p) != len(r):
            raise ValueError(f"sentence {k}: {len(p)} predicted tags for {len(r)} reference tags")
        pe, re_ = _entities(p), _entities(r)
        tp, n_pred, n_ref = tp + len(pe & re_), n_pred + len(pe), n_ref + len(re_)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_ref if n_ref else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"entity_f1": f1, "entity_precision": prec, "entity_recall": rec}


# Constraints are stated in the instruction in fixed English phrases (recipes/data/make_scenarios.py writes them);
# `parse_constraints` reads them back, `satisfies` checks an output against them.
_RANGE = re.compile(r"between (\d+) and (\d+) words")
_WORDS = re.compile(r'[Uu]se the words? ((?:"[^"]+"(?:, | and )?)+)')
_END = {"an exclamation mark": "!", "a question mark": "?", "a full stop": "."}


def parse_constraints(instruction: str) -> dict:
    c: dict = {}
    if m := _RANGE.search(instruction):
        c["min_words"], c["max_words"] = int(m.group(1)), int(m.group(2))
    if m := _WORDS.search(instruction):
        c["must_include"] = re.findall(r'"([^"]+)"', m.group(1))
    for phrase, ch in _END.items():
        if f"End with {phrase}" in instruction:
            c["end_with"] = ch
    if m := re.search(r"Start with the word \"([^\"]+)\"", instruction):
        c["start_with"] = m.group(1)
    return c


def satisfies(text: str, c: dict) -> bool:
    """True when `text` meets every constraint in `c` (words are letters, digits, apostrophes and hyphens)."""
    text = text.strip()
    words = re.findall(r"[A-Za-z0-9][A-Za-z0-9'-]*", text)
    lower = [w.lower() for w in words]
    if "min_words" in c and not c["min_words"] <= len(words) <= c["max_words"]:
        return False
    if any(w.lower() not in lower for w in c.get("must_include", [])):
        return False
    if "end_with" in c and not text.endswith(c["end_with"]):
        return False
    if "start_with" in c and (not lower or lower[0] != c["start_with"].lower()):
        return False
    return bool(text)


def constraint_rate(predictions: Sequence[str], constraints: Sequence[dict]) -> float:
    """Fraction of outputs that satisfy all of their constraints."""
    _check(predictions, constraints)
    if not all(constraints):
        raise ValueError("constraint_rate: an example has no constraints (its instruction states none)")
    return sum(satisfies(p, c) for p, c in zip(predictions, constraints)) / len(constraints)


def _check(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or not b:
        raise ValueError("a metric needs equal, non-empty lists of predictions and references")


# Metric name (a recipe's metric.name) -> the figures reported with it. The first is the headline metric.
FAMILIES = {
    "exact_match": ["exact_match"],
    "accuracy": ["accuracy", "macro_f1"],
    "macro_f1": ["macro_f1", "accuracy"],
    "chrf": ["chrf", "bleu"],
    "bleu": ["bleu", "chrf"],
    "token_f1": ["token_f1", "squad_exact_match"],
    "constraint_rate": ["constraint_rate"],
    "entity_f1": ["entity_f1", "entity_precision", "entity_recall"],
    "perplexity": [],
}
GENERATIVE = {"exact_match", "accuracy", "macro_f1", "chrf", "bleu", "token_f1", "constraint_rate"}
LOWER_IS_BETTER = {"perplexity"}


def task_scores(metric: str, predictions: Sequence, references: Sequence, constraints: Sequence[dict] = ()) -> dict:
    """Every figure of the metric's family, for one list of predictions: what evaluate.py and validate.py call."""
    fns = {"exact_match": exact_match, "accuracy": accuracy, "macro_f1": macro_f1, "chrf": chrf, "bleu": bleu,
           "token_f1": token_f1, "squad_exact_match": squad_exact_match}
    if metric == "entity_f1":
        return entity_scores(predictions, references)
    if metric == "constraint_rate":
        return {"constraint_rate": constraint_rate(predictions, constraints)}
    if metric not in FAMILIES:
        raise ValueError(f"unknown metric '{metric}'; known: {', '.join(FAMILIES)}")
    return {name: fns[name](predictions, references) for name in FAMILIES[metric]}


# ------------------------------------------------------------------------------------------- logits vs a reference
# How far a quantized model's next-token distributions are from the full-precision model's, on the same token ids:
# the perplexity of each on the text, how often their top-1 tokens agree, and the mean KL(reference || quantized).
# numpy only (a device can run it).


def log_softmax(x):
    """Log-probabilities over the last axis, in x's own float dtype."""
    import numpy as np

    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class LogitStats:
    """Accumulates, over sequences, reference and quantized logits [positions, vocab] with the next-token labels
    [positions]: update(), then result().

    Δperplexity comes with its 95% interval from the spread of the per-position log-likelihood differences (as
    llama.cpp's perplexity tool reports it; positions in one text are not independent, so the interval is a lower
    bound on the uncertainty). On a few thousand positions a Δperplexity of a few percent can be noise; the mean KL
    is the steadier figure."""

    def __init__(self):
        self.nll_ref = self.nll_q = self.kl = self.d2 = 0.0
        self.agree = self.n = 0

    def update(self, ref_logits, q_logits, labels) -> None:
        import numpy as np

        ref, q, labels = np.asarray(ref_logits), np.asarray(q_logits), np.asarray(labels)
        if ref.shape != q.shape or ref.ndim != 2 or labels.shape != ref.shape[:1]:
            raise ValueError(f"logits {ref.shape} / {q.shape} and labels {labels.shape} do not line up")
        lr, lq = log_softmax(ref.astype(np.float64)), log_softmax(q.astype(np.float64))
        rows = np.arange(len(labels))
        r, k = lr[rows, labels], lq[rows, labels]  # log-likelihood of each label, reference and quantized
        self.add(-float(r.sum()), -float(k.sum()), float(((r - k) ** 2).sum()), float((np.exp(lr) * (lr - lq)).sum()),
                 int((ref.argmax(-1) == q.argmax(-1)).sum()), len(labels))

    def add(self, nll_ref: float, nll_q: float, d2: float, kl: float, agree: int, n: int) -> None:
        """Sums over n positions computed elsewhere (hf/retention.drift does them in torch): label NLL of each model,
        squared per-position NLL difference, KL(reference || quantized), top-1 agreements."""
        self.nll_ref += nll_ref
        self.nll_q += nll_q
        self.d2 += d2
        self.kl += kl
        self.agree += agree
        self.n += n

    def result(self) -> dict:
        if not self.n:
            raise ValueError("LogitStats needs at least one scored position")
        import math

        ppl_ref, ppl_q = perplexity(self.nll_ref, self.n), perplexity(self.nll_q, self.n)
        mean = (self.nll_q - self.nll_ref) / self.n
        se = math.sqrt(max(self.d2 / self.n - mean * mean, 0.0) / max(self.n - 1, 1))
        return {"positions": self.n, "ppl_ref": ppl_ref, "ppl": ppl_q, "delta_ppl_pct": 100 * (ppl_q / ppl_ref - 1),
                "delta_ppl_ci95_pct": [100 * math.expm1(mean - 1.96 * se), 100 * math.expm1(mean + 1.96 * se)],
                "top1_agreement": self.agree / self.n, "mean_kl": self.kl / self.n}
