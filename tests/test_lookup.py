"""Prompt-lookup decoding (toolchain/runtime/lookup.py): the drafts, the loop against a scripted model, and on
onnxruntime-genai, where an fp32 model must give exactly greedy's tokens."""
from __future__ import annotations

import numpy as np
import pytest

from toolchain.runtime import genai
from toolchain.runtime.lookup import decode, draft
from toolchain.runtime.validate import latency


def test_draft_takes_the_latest_match_of_the_longest_tail():
    ctx = [1, 2, 3, 9, 9, 7, 2, 3, 5, 6, 1, 2, 3]
    # tail (1, 2, 3) occurs once earlier, at 0; the 3-token tail wins over the later 2-token match (2, 3) at 6
    assert draft(ctx, 4) == [9, 9, 7, 2]
    assert draft(ctx, 2) == [9, 9]
    assert draft(ctx, 4, ngram=(2, 2)) == [5, 6, 1, 2]  # the latest occurrence of (2, 3)
    assert draft([4, 5, 6, 7, 8, 4, 5], 3) == []  # a 2-token tail is too short by default
    assert draft([4, 5, 6, 7, 8, 4, 5], 3, ngram=(3, 2)) == [6, 7, 8]
    assert draft([1, 2, 3, 1, 2, 3], 0) == [] and draft([1, 2], 3) == []
    assert draft([7, 8, 9, 7, 8, 9], 10) == [7, 8, 9]  # a draft stops at the context's end


class Scripted:
    """A 'model' whose greedy next token is a fixed function of the context, with a KV cache that must stay in
    step with what decode() believes was fed."""

    def __init__(self, prompt, rule):
        self.fed, self.rule, self.passes = list(prompt), rule, 0

    def forward(self, tokens):
        self.passes += 1
        out = []
        for t in tokens:
            self.fed.append(t)
            out.append(self.rule(self.fed))
        return np.array(out)

    def rewind(self, n):
        assert 0 < n < len(self.fed)
        del self.fed[-n:]


def periodic(ctx):  # repeats the last 5 tokens, except that every 13th position breaks the pattern
    return 100 + len(ctx) if len(ctx) % 13 == 0 else ctx[-5]


def _greedy(prompt, first, rule, n):
    ctx, out = list(prompt), [first]
    while len(out) < n:
        ctx.append(out[-1])
        out.append(rule(ctx))
    return out


@pytest.mark.parametrize("k", [1, 3, 8])
def test_lookup_loop_gives_greedys_tokens_in_fewer_passes(k):
    prompt = [1, 2, 3, 4, 5, 6, 7]
    m = Scripted(prompt, periodic)
    out, steps = decode(prompt, periodic(prompt), m.forward, m.rewind, 60, k)
    assert out == _greedy(prompt, periodic(prompt), periodic, 60)
    assert steps == m.passes and steps < 59  # drafts were accepted...
    assert m.fed[:len(prompt) + len(out) - 1] == prompt + out[:-1]  # ...and the rejected ones rewound
    assert len(m.fed) <= len(prompt) + len(out) - 1 + k


def test_lookup_loop_stops_at_a_stop_token_and_keeps_it():
    prompt = [1, 2, 3, 4, 5, 6, 7]
    want = _greedy(prompt, periodic(prompt), periodic, 60)
    stop = want[20]
    m = Scripted(prompt, periodic)
    out, _ = decode(prompt, periodic(prompt), m.forward, m.rewind, 60, 8, stop=(stop,))
    assert out == want[:want.index(stop) + 1]


@pytest.fixture(scope="module")
def tiny_fp32(tiny_phi3, tmp_path_factory):
    from toolchain.stages.export.decoder import export

    out = tmp_path_factory.mktemp("lookup") / "fp32"
    export(tiny_phi3, out, exporter="genai")
    return genai.load(out)


def test_genai_lookup_matches_greedy_on_an_fp32_model(tiny_fp32):
    model, tok = tiny_fp32
    eos = genai.eos_ids(tok)
    prompt = [int(x) for x in tok.encode("Book 2 seats in Oslo. Book 2 seats in Oslo. Book 2 seats in")]
    plain = genai.generate(model, prompt, 48, force_length=True)
    for k in (2, 8):
        look = genai.generate(model, prompt, 48, force_length=True, lookup=k, eos=eos)
        assert look.tokens == plain.tokens, k
        assert look.steps < len(look.tokens) - 1  # some drafts were accepted, so the KV cache was rewound and reused
    # a natural stop: treat a token greedy emits as the end of sequence; both loops end there, keeping it
    stop = plain.tokens[30]
    want = plain.tokens[:plain.tokens.index(stop) + 1]
    assert genai.generate(model, prompt, 48, lookup=8, eos=(stop,)).tokens == want


def test_latency_reports_lookup_beside_plain(tiny_fp32):
    model, tok = tiny_fp32
    prompt = [int(x) for x in tok.encode("Book 2 seats in Oslo. Book 2 seats in")]
    lat = latency(model, prompt, new_tokens=24, runs=1, lookup=8, eos=genai.eos_ids(tok))
    assert lat["decode_tok_s_p50"] > 0 and lat["lookup_decode_tok_s_p50"] > 0
    assert lat["lookup_token_agreement"] == 1.0 and lat["lookup_tokens_per_step"] >= 1.0
    assert "lookup_decode_tok_s_p50" not in latency(model, prompt, new_tokens=8, runs=1)
