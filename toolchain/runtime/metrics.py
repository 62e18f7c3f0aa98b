"""Task metrics shared by the torch side (reference numbers) and the device side (ORT validation). No torch."""
from __future__ import annotations

import math
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
