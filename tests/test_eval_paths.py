"""The fast scoring paths of the fine-tune stage give the figures of the plain ones: held-out NLL on the answer
positions only, the adapter folded for generation, drift's sums in torch. A tiny random Phi-3, no data files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from toolchain.config.schema import MethodSpec
from toolchain.hf.evaluate import heldout_nll
from toolchain.hf.models import load_causal_lm
from toolchain.hf.retention import _add as drift_sums
from toolchain.runtime.metrics import LogitStats
from toolchain.stages.finetune import methods


def _full_logits_nll(model, examples):
    """The reference: full logits at every position, log_softmax, the labels' log-probabilities."""
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            lab = torch.tensor(e["labels"][1:])
            keep = lab != -100
            total -= float(logp[keep].gather(-1, lab[keep].unsqueeze(-1)).sum())
            count += int(keep.sum())
    return total, count


@pytest.fixture(scope="module")
def lora_net(tiny_phi3):
    torch.manual_seed(0)
    net = methods.trainable(load_causal_lm(tiny_phi3), MethodSpec(type="lora", r=4, alpha=8), None, False, False)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init, which would make folding a no-op
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return net.eval()


def _examples(vocab: int, n: int = 5):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        ids = rng.integers(3, vocab, size=12 + 3 * i).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (len(ids) - 4) + ids[-4:]})  # loss on the last 4 only
    return out


def test_answer_positions_nll_equals_full_logits(lora_net):
    ex = _examples(lora_net.config.vocab_size)
    fast = heldout_nll(lora_net, ex, pad_id=0, batch_size=2)  # padded batches, lm_head on label positions only
    ref = _full_logits_nll(lora_net, ex)
    assert fast[1] == ref[1] == 4 * len(ex)
    assert fast[0] == pytest.approx(ref[0], rel=1e-5)


def test_batched_drift_equals_one_conversation_at_a_time(lora_net, tiny_phi3):
    """Right-padded batches of like lengths give the one-at-a-time figures, the adapter switched off for the base."""
    from toolchain.config.catalog import RETENTION_SET
    from toolchain.hf.models import load_tokenizer
    from toolchain.hf.retention import drift, read_items

    tok, items = load_tokenizer(tiny_phi3), read_items(RETENTION_SET)[:11]
    one, batched = drift(lora_net, tok, items, batch_size=1), drift(lora_net, tok, items, batch_size=4)
    assert one["drift_positions"] == batched["drift_positions"] > 11 * 10
    assert batched["drift_mean_kl"] == pytest.approx(one["drift_mean_kl"], rel=1e-5) and one["drift_mean_kl"] > 0
    assert batched["drift_top1_agreement"] == one["drift_top1_agreement"] < 1


def test_folding_the_adapter_keeps_logits_and_is_undone(lora_net):
    ids = torch.tensor([_examples(lora_net.config.vocab_size)[2]["input_ids"]])
    before = {n: p.detach().clone() for n, p in lora_net.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        plain = lora_net(input_ids=ids).logits
        with lora_net.disable_adapter():
            base = lora_net(input_ids=ids).logits
        with methods.folded(lora_net, MethodSpec(type="lora")):
            merged = lora_net(input_ids=ids).logits
        after = lora_net(input_ids=ids).logits
    assert (plain - base).abs().max() > 1e-3  # the adapter changes the output, so the check below can fail
    assert torch.allclose(merged, plain, atol=1e-4)
    assert torch.allclose(after, plain, atol=1e-5)  # unmerged again: the adapter still applies, and only once
    for n, p in lora_net.named_parameters():
        if n in before:
            assert torch.allclose(p, before[n], atol=1e-6), n


def test_qlora_and_full_are_not_folded(lora_net):
    for kind in ("qlora", "full"):
        with methods.folded(lora_net, MethodSpec(type=kind)):
            assert not any(getattr(m, "merged", False) for m in lora_net.modules())


def test_drift_sums_in_torch_equal_logitstats_update():
    rng = np.random.default_rng(0)
    ref, q = rng.normal(size=(9, 50)).astype(np.float32), rng.normal(size=(9, 50)).astype(np.float32)
    labels = rng.integers(0, 50, size=9)
    a, b = LogitStats(), LogitStats()
    a.update(ref, q, labels)
    drift_sums(b, torch.from_numpy(ref), torch.from_numpy(q), torch.from_numpy(labels))
    ra, rb = a.result(), b.result()
    assert ra["positions"] == rb["positions"] == 9 and ra["top1_agreement"] == rb["top1_agreement"]
    for k in ("ppl_ref", "ppl", "mean_kl", "delta_ppl_pct"):
        assert rb[k] == pytest.approx(ra[k], rel=1e-9), k


def test_the_reference_tokens_are_the_tuned_torch_models_greedy_answers(tiny_artifact):
    """The reference stage takes the fine-tune stage's greedy tokens instead of generating again with the fp32 ONNX
    model: each shipped generation row carries them, the fp32 ONNX model scores perplexity, and validate measures
    the artifact's agreement with them."""
    import json
    from pathlib import Path

    root, _, rep = tiny_artifact
    stages = next((root / "artifacts").glob("*/stages"))
    greedy = json.loads((stages / "finetune" / "greedy_tokens.json").read_text())
    art = Path(rep["artifact"])
    rows = [json.loads(x) for x in (art / "eval.jsonl").read_text().splitlines() if x.strip()]
    shipped = [r["fp32_tokens"] for r in rows if "prompt_ids" in r]
    assert shipped == greedy and len(greedy) == rep["measured"]["eval_examples"] > 0
    ref = rep["reference"]["onnx_fp32"]
    assert ref["perplexity"] > 1 and "reference tokens" in ref["source"] and "exact_match" not in ref
    assert 0 <= rep["measured"]["token_agreement_fp32"] <= 1
    assert "greedy token agreement with tuned torch" in (art / "report.md").read_text()


def test_length_sorted_micro_batches_give_the_same_gradient(lora_net):
    """train.sort_micro_batches: the step's examples sorted by length, then cut; the summed-token gradient is the
    unsorted single batch's (to float rounding), and each micro-batch holds like lengths."""
    from toolchain.hf.models import collate
    from toolchain.stages.finetune.batching import causal_lm_loss, micro_batches

    ex = _examples(lora_net.config.vocab_size, n=4)[::-1]  # longest first
    idx = [0, 1, 2, 3]
    cuts = micro_batches(idx, 0, 1, 2, length=lambda i: len(ex[i]["input_ids"]))
    assert cuts == [[3, 2], [1, 0]]  # shortest two together
    denom = sum(4 for _ in ex)
    params = [p for p in lora_net.parameters() if p.requires_grad]

    def grads(batches):
        lora_net.zero_grad()
        for mb in batches:
            (causal_lm_loss(lora_net, collate([ex[i] for i in mb], 0), reduction="sum") / denom).backward()
        return [p.grad.clone() for p in params]

    for a, b in zip(grads([idx]), grads(cuts)):
        assert torch.allclose(a, b, atol=1e-6)
    lora_net.zero_grad()


def test_generate_sorts_by_length_and_answers_in_prompt_order(lora_net, tiny_phi3):
    """generate() batches prompts of like lengths together; each completion and its token ids still come back at
    its prompt's place, as each prompt answered alone gives them."""
    from toolchain.hf.evaluate import generate
    from toolchain.hf.models import load_tokenizer
    tok = load_tokenizer(tiny_phi3)
    prompts = ["a much longer booking request for Kazan, three tickets", "hi", "two tickets for Oslo", "x y"]
    assert len({len(tok(p)["input_ids"]) for p in prompts}) == len(prompts)  # unsorted, all lengths differ
    ids = []
    texts = generate(lora_net, tok, prompts, 6, batch_size=2, tokens=ids)
    alone = [generate(lora_net, tok, [p], 6, batch_size=1, tokens=(t := [])) and t[0] for p in prompts]
    assert ids == alone
    assert texts == [tok.decode(t, skip_special_tokens=True) for t in alone]


def test_stopping_at_the_first_mismatch_keeps_exact_match(lora_net, tiny_phi3):
    """Each answer stops once it can no longer equal its reference: the answers that match come back whole, the
    others cut short of max_new_tokens, and exact match is what the whole answers give."""
    from toolchain.hf.evaluate import generate
    from toolchain.hf.models import load_tokenizer
    from toolchain.runtime.metrics import exact_match
    tok = load_tokenizer(tiny_phi3)
    prompts = ["two tickets for Oslo", "hi", "a booking for Kazan", "x y", "three for Rome, the 4th"]
    whole_ids = []
    whole = generate(lora_net, tok, prompts, 12, batch_size=2, tokens=whole_ids)
    assert all(len(t) == 12 for t in whole_ids)  # a random model: no end of turn, every answer runs to the limit
    refs = [whole[0], "nothing like it", whole[2] + " and more", "?" + whole[3], " " + whole[4] + " "]
    cut_ids = []
    cut = generate(lora_net, tok, prompts, 12, batch_size=2, tokens=cut_ids, unless=refs)
    assert exact_match(cut, refs) == exact_match(whole, refs) == 0.4  # rows 0 and 4 match
    assert cut_ids[0] == whole_ids[0] and cut_ids[4] == whole_ids[4]
    assert all(len(cut_ids[i]) < 12 for i in (1, 3))  # stopped at a mismatch (row 2 is a prefix: it runs on)
    assert cut[2] == whole[2]


def test_validate_reports_each_answer_as_it_is_generated(monkeypatch):
    """The one-prefill path answers rows while it scores them: progress comes after each answer, not all at the end."""
    from toolchain.runtime import genai, validate

    log = []

    def one_pass(model, input_ids, labels, k, max_new_tokens, eos):
        log.append("answer")
        return 1.0, 2, genai.Generation(tokens=[5, 0], prompt_tokens=k, ttft_s=0.01, decode_s=0.01)

    monkeypatch.setattr(genai, "eos_ids", lambda tok: (0,))
    monkeypatch.setattr(genai, "nll_then_generate", one_pass)
    monkeypatch.setattr(genai, "decode", lambda tok, ids: "x")
    rows = [{"input_ids": [1, 2, 3], "labels": [-100, 3, 4], "prompt_ids": [1, 2], "reference": "x"} for _ in range(3)]
    out, generated = validate.accuracy(None, None, rows, "exact_match", 8, progress=lambda i, n: log.append((i, n)))
    assert log == ["answer", (1, 3), "answer", (2, 3), "answer", (3, 3)]
    assert out["exact_match"] == 1.0 and generated == [[5, 0]] * 3


def test_drift_is_scored_before_the_adapter_is_folded(tiny_phi3, tmp_path, monkeypatch):
    """Unfolding does not give a bf16 base its weights back to the last bit, so drift, which switches the adapter
    off for the base's logits, runs on the weights as trained, before the folded generation."""
    from conftest import finetune, tiny_recipe_file
    from toolchain.hf import retention as retention_mod
    from toolchain.stages.finetune import decoder

    calls, fold, drift = [], methods.folded, retention_mod.drift
    merged = lambda net: any(getattr(m, "merged", False) for m in net.modules())  # a LoRA layer holds its delta

    def folded(net, method):
        calls.append(("fold", merged(net)))
        return fold(net, method)

    def recorded(tuned, *a, **k):
        calls.append(("drift", merged(tuned)))
        return drift(tuned, *a, **k)

    monkeypatch.setattr(decoder.methods, "folded", folded)
    monkeypatch.setattr(decoder.retention_mod, "drift", recorded)
    res = finetune(str(tiny_phi3), str(tiny_recipe_file(tmp_path)), tmp_path / "ft", max_steps=1)
    assert [c[0] for c in calls] == ["drift", "fold"] and calls[0][1] is False
    assert "drift_mean_kl" in res["tuned"] and "exact_match" in res["tuned"]
