"""The pure parts of bench/decode.py: logit-quality metrics on tiny arrays, the run summary and the results table.
No model, no llama-cpp-python (only the llama.cpp part needs it, and it is not exercised here)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from toolchain.runtime.metrics import LogitStats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def decode():
    spec = importlib.util.spec_from_file_location("bench_decode", REPO / "bench" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports nothing heavy at module level (no torch, no llama_cpp)
    return mod


def test_identical_logits_are_a_perfect_match():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 7))
    s = LogitStats()
    s.update(ref, ref.copy(), np.array([0, 1, 2, 3, 4]))
    r = s.result()
    assert r["delta_ppl_pct"] == pytest.approx(0, abs=1e-9)
    assert r["top1_agreement"] == 1.0
    assert r["mean_kl"] == pytest.approx(0, abs=1e-12)
    assert r["positions"] == 5


def test_perplexity_kl_and_agreement_by_hand():
    # two positions, vocab 2; reference uniform, quantized log-odds ln 3 towards token 0
    ref = np.zeros((2, 2))
    q = np.array([[math.log(3), 0.0], [0.0, math.log(3)]])  # p = (3/4, 1/4), then (1/4, 3/4)
    labels = np.array([0, 0])
    s = LogitStats()
    s.update(ref, q, labels)
    r = s.result()
    assert r["ppl_ref"] == pytest.approx(2.0)
    assert r["ppl"] == pytest.approx(math.exp(-(math.log(0.75) + math.log(0.25)) / 2))
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # the same at both positions
    assert r["mean_kl"] == pytest.approx(kl)
    # argmax of a uniform row is token 0: agrees at position 0 only
    assert r["top1_agreement"] == pytest.approx(0.5)


def test_delta_perplexity_interval():
    # the by-hand case above: per-position differences ln(2/3) and ln 2, mean m, population spread sd
    d = np.array([math.log(2 / 3), math.log(2)])
    m, se = d.mean(), d.std() / math.sqrt(1)
    s = LogitStats()
    s.update(np.zeros((2, 2)), np.array([[math.log(3), 0.0], [0.0, math.log(3)]]), np.array([0, 0]))
    lo, hi = s.result()["delta_ppl_ci95_pct"]
    assert lo == pytest.approx(100 * math.expm1(m - 1.96 * se)) and hi == pytest.approx(100 * math.expm1(m + 1.96 * se))
    assert lo < s.result()["delta_ppl_pct"] < hi
    # the same difference at every position: no spread, the interval is the point
    ref = np.tile(np.random.default_rng(3).normal(size=(1, 4)), (6, 1))
    q = ref.copy()
    q[:, 0] -= 0.1
    s = LogitStats()
    s.update(ref, q, np.zeros(6, dtype=int))
    r = s.result()
    assert r["delta_ppl_pct"] > 0
    assert r["delta_ppl_ci95_pct"] == pytest.approx([r["delta_ppl_pct"]] * 2)


def test_stats_accumulate_over_sequences_like_one_batch():
    rng = np.random.default_rng(1)
    ref, q = rng.normal(size=(9, 11)), rng.normal(size=(9, 11))
    labels = rng.integers(0, 11, size=9)
    whole, parts = LogitStats(), LogitStats()
    whole.update(ref, q, labels)
    parts.update(ref[:4], q[:4], labels[:4])
    parts.update(ref[4:], q[4:], labels[4:])
    for k, v in whole.result().items():
        assert parts.result()[k] == pytest.approx(v)


def test_shift_invariance_and_bad_shapes():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(3, 5))
    s = LogitStats()
    s.update(ref, ref + 4.0, np.array([1, 2, 3]))  # a constant per row changes no probability
    assert s.result()["mean_kl"] == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError):
        s.update(ref, ref[:2], np.array([1, 2, 3]))
    with pytest.raises(ValueError):
        LogitStats().result()


def test_summarize_takes_medians(decode):
    runs = [{"prefill_s": 0.5, "ttft_s": 0.6, "decode_s": 1.0, "new": 11},
            {"prefill_s": 0.25, "ttft_s": 0.3, "decode_s": 2.0, "new": 11},
            {"prefill_s": 1.0, "ttft_s": 1.1, "decode_s": 0.5, "new": 11}]
    s = decode.summarize(runs, prompt_tokens=100)
    assert s["prefill_tok_s"] == pytest.approx(200)
    assert s["decode_tok_s"] == pytest.approx(10)  # 10 decoded tokens after the first, median of 10, 5, 20
    assert s["ttft_ms"] == pytest.approx(600)
    assert s["n_runs"] == 3


def _row(name, threads, decode_tok_s, prefill_tok_s):
    return {"name": name, "threads": threads, "size_mb": 80.0, "peak_rss_mb": 300.0, "by_prompt": {
        "32": {"summary": {"decode_tok_s": decode_tok_s, "prefill_tok_s": prefill_tok_s, "ttft_ms": 10.0}},
        "512": {"summary": {"decode_tok_s": decode_tok_s / 2, "prefill_tok_s": prefill_tok_s * 2, "ttft_ms": 50.0}}}}


def test_table_ratios_are_to_the_baseline_at_the_same_threads(decode):
    results = {"speed": [_row("llama.cpp Q4_0", 1, 50, 400), _row("llama.cpp Q4_0", 2, 90, 700),
                         _row("ours cpu-int4", 1, 75, 400), _row("ours cpu-int4", 2, 90, 1400)],
               "quality": {"ours cpu-int4": {"text": {"delta_ppl_pct": 3.21, "top1_agreement": 0.9, "mean_kl": 0.05},
                                             "chat": {"delta_ppl_pct": 1.0}}}}
    md = decode.table(results).splitlines()
    assert md[0].startswith("| runtime | threads | decode tok/s (p32)")
    assert len(md) == 2 + 4
    ours1 = next(x for x in md if x.startswith("| ours cpu-int4 | 1 |"))
    ours2 = next(x for x in md if x.startswith("| ours cpu-int4 | 2 |"))
    assert "| 1.50× | 1.00× |" in ours1  # decode 75/50 at p32, prefill 800/800 at p512
    assert "| 1.00× | 2.00× |" in ours2
    assert "+3.21" in ours1 and "0.900" in ours1
    llama = next(x for x in md if x.startswith("| llama.cpp Q4_0 | 1 |"))
    assert "| – |" in llama  # no quality row for it: a dash, not a crash


def test_table_without_a_baseline_has_no_ratios(decode):
    md = decode.table({"speed": [_row("ours cpu-int4", 2, 90, 1400)]})
    assert "×" not in md and "| – | – |" in md


def test_llama_rows_need_llama_cpp_python(decode):
    if decode.have_llama():
        pytest.skip("llama-cpp-python is installed: nothing to check about its absence")
    with pytest.raises(ImportError):
        decode.llama_models(Path("unused"))


def test_lookup_table_compares_with_llama_plain_at_the_same_threads():
    spec = importlib.util.spec_from_file_location("bench_lookup", REPO / "bench" / "lookup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(runtime, t, k, text, chat):
        w = lambda v: {"decode_tok_s": v, "tokens_per_step": 1.0, "same_as_plain": 2, "prompts": 2}  # noqa: E731
        return {"runtime": runtime, "threads": t, "k": k, "text": w(text), "chat": w(chat)}

    md = mod.table({"rows": [row("llama.cpp Q4_0", 1, 0, 100.0, 50.0), row("ours cpu-int4", 1, 3, 150.0, 40.0),
                             row("llama.cpp Q4_0", 2, 0, 200.0, 80.0), row("ours cpu-int4", 2, 3, 300.0, 100.0)]})
    lines = md.splitlines()
    assert "| ours cpu-int4 | 1 | lookup k=3 | 150.0 | 1.50x |" in lines[3] and "| 40.0 | 0.80x |" in lines[3]
    assert "| 300.0 | 1.50x |" in lines[5] and "| 100.0 | 1.25x |" in lines[5] and "| plain |" in lines[4]


def test_a_shipped_variant_is_timed_once_as_the_recipes_own(decode):
    """A recipe that ships MIXED keeps its own row and drops the MIXED twin; all-int4, unshipped, stays."""
    from toolchain.config.schema import QuantizeSpec

    spec = QuantizeSpec(**decode.MIXED)
    mixed, all_int4 = QuantizeSpec(**decode.MIXED), QuantizeSpec(**decode.ALL_INT4)
    rows = [("ours", spec), ("mixed", mixed), ("all-int4", all_int4), ("fp32", None)]
    kept = decode.unshipped([(n, None, None, sp) for n, sp in rows], spec, (mixed, all_int4))
    assert [v[0] for v in kept] == ["ours", "all-int4", "fp32"]
    other = QuantizeSpec(lm_head_bits=8)  # neither variant (the schema's defaults are all-int4)
    assert [v[0] for v in decode.unshipped([(n, None, None, sp) for n, sp in rows], other, (mixed, all_int4))] \
        == ["ours", "mixed", "all-int4", "fp32"]
