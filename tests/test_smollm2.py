"""The real SmolLM2 weights through a short finetune and merge (a few steps; the full run is `make edge`)."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from conftest import finetune, merge
from toolchain.hf.models import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow  # the real SmolLM2 weights: make test-all


def test_smollm2_short_finetune_and_merge(smollm2, tiny_recipe, tmp_path):
    ft = tmp_path / "ft"
    res = finetune("smollm2-135m", str(tiny_recipe), ft)
    assert res["model"] == "smollm2-135m" and res["train"]["steps"] == 4
    # four steps on the booking task already lower the held-out loss of the real model
    assert res["tuned"]["eval_loss"] < res["base"]["eval_loss"]
    rep = merge("smollm2-135m", ft, tmp_path / "merged")
    assert rep["max_abs_logit_diff"] <= 1e-3

    # the merged folder equals base + adapter, loaded independently, on a chat prompt
    tok = load_tokenizer(tmp_path / "merged")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Book 2 seats in Oslo for 3 May. Name: Ana Lee."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0, 0].item() == start and ids[0, 1].item() != start  # no doubled BOS
    assert (ids[0] == start).sum().item() == prompt.count("<|im_start|>")
    with torch.no_grad():
        merged = load_causal_lm(tmp_path / "merged")(ids).logits
        ref = PeftModel.from_pretrained(load_causal_lm(smollm2), ft / "adapter")(ids).logits
    assert (merged - ref).abs().max().item() <= 1e-3
    gen = json.loads((tmp_path / "merged/generation_config.json").read_text())
    assert gen["eos_token_id"] in (2, [2])  # <|im_end|> ends a turn
