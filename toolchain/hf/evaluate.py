"""Held-out scores of a torch model: loss/perplexity by teacher forcing and the recipe's metric by greedy generation."""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from toolchain.hf.data import Dataset, generation_pair
from toolchain.hf.models import collate
from toolchain.runtime import metrics


@torch.no_grad()
def heldout_nll(model, examples: list[dict], pad_id: int, batch_size: int = 8) -> tuple[float, int]:
    """Sum of token NLL over the loss-carrying tokens, and their count. The output projection and the softmax run
    on those positions only (the answers, a fifth of a chat's tokens), over batches of like lengths: the same sums to
    float rounding. Answer positions alone took SmolLM2's 64 held-out chats from 40 s to 24 s on a 2-core AVX2 EPYC."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    total, count = 0.0, 0
    examples = sorted(examples, key=lambda e: len(e["input_ids"]))  # batches of like lengths: little padding
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i : i + batch_size], pad_id)
        hidden = decoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        labels = b["labels"][:, 1:]
        keep = labels != -100
        logits = head(hidden[:, :-1][keep]).float()
        total += float(torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total, count


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str = "generate",
             tokens: Optional[list] = None, unless: Optional[list[str]] = None) -> list[str]:
    """Greedy completions, in the order of `prompts`, batched with left padding over prompts of like lengths;
    decoding stops at the model's end-of-turn tokens. tokens: a list that gets each completion's token ids, up to and
    including its end-of-turn token (as onnxruntime-genai returns them). unless: a reference per prompt; a
    completion then stops as soon as it can no longer equal its reference (exact match), and comes back cut there.

    Batches of like lengths pad less: SmolLM2's 64 chat-lora prompts (63-125 tokens), 40 new tokens in batches of
    16, took 35.6 s instead of 44.6 s on a 2-core Xeon (AVX512, AMX); a prefill of a padded batch costs as much as
    its longest prompt times its size."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    enc = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    texts, ids = [None] * len(enc), [None] * len(enc)
    for i in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        rows = order[i : i + batch_size]
        b = collate([{"input_ids": enc[r]} for r in rows], tok.pad_token_id, left=True)
        stop = StoppingCriteriaList([_Mismatch(tok, [unless[r] for r in rows], b["input_ids"].shape[1])]) \
            if unless is not None else None
        gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                             stopping_criteria=stop)
        new = gen[:, b["input_ids"].shape[1]:]
        for r, text, row in zip(rows, tok.batch_decode(new, skip_special_tokens=True), new):
            texts[r], ids[r] = text, _until_eos(row.tolist(), eos)
    if tokens is not None:
        tokens += ids
    return texts


class _Mismatch(StoppingCriteria):
    """Per row: done once the text so far, stripped, is no prefix of the stripped reference. Then no continuation can
    make `prediction.strip() == reference.strip()`: the text's first characters are fixed. A trailing U+FFFD (half
    of a multi-byte character) is not judged yet."""

    def __init__(self, tok, references: list[str], prompt_len: int):
        self.tok, self.refs, self.start = tok, [r.strip() for r in references], prompt_len

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([not r.startswith(t.rstrip("\ufffd").strip()) for t, r in zip(texts, self.refs)],
                            dtype=torch.bool, device=input_ids.device)


def _until_eos(ids: list[int], eos: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1]
    return ids


def score(model, tok, recipe, ds: Dataset, desc: str = "eval", tokens: Optional[list] = None,
          stop_at_mismatch: bool = False) -> dict:
    """{'eval_loss', 'perplexity', <metric>} on the held-out split, plus a few sample predictions. tokens: a list
    that gets the greedy token ids of each generated answer (generate()). stop_at_mismatch: under exact_match, each
    answer stops where it can no longer match (the same score; the base model, which matches few, answers in a few
    tokens instead of max_new_tokens); its samples are then cut there."""
    nll, n = heldout_nll(model, ds.eval, tok.pad_token_id)
    out = {"eval_loss": nll / n, "perplexity": metrics.perplexity(nll, n), "eval_tokens": n}
    m = recipe.metric
    if m.name in metrics.GENERATIVE:
        pairs = [p for p in (generation_pair(r, tok) for r in ds.eval_rows[: m.eval_limit]) if p]
        cut = stop_at_mismatch and m.name == "exact_match"
        preds = generate(model, tok, [p for p, _ in pairs], m.max_new_tokens, m.batch_size, desc=desc, tokens=tokens,
                         unless=[r for _, r in pairs] if cut else None)
        constraints = [metrics.parse_constraints(p) for p, _ in pairs] if m.name == "constraint_rate" else ()
        out.update(metrics.task_scores(m.name, preds, [r for _, r in pairs], constraints))
        out["eval_examples"] = len(pairs)
        out["samples"] = [{"reference": r, "prediction": p} for (_, r), p in list(zip(pairs, preds))[:3]]
        if cut:
            out["samples_cut_at_mismatch"] = True
    return out
