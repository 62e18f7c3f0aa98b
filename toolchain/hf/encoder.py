"""The torch side of the encoder path: which HF head and PEFT task each encoder task uses, and a torch forward
pass with the same batch interface as runtime/encoder.ort_forward (numpy in, logits out)."""
from __future__ import annotations

import numpy as np

# task -> (Optimum export task, PEFT task type)
TASKS = {"classify": ("text-classification", "SEQ_CLS"), "ner": ("token-classification", "TOKEN_CLS")}


def head_class(task: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForSequenceClassification if task == "classify" else AutoModelForTokenClassification


def torch_forward(net):
    import torch

    @torch.no_grad()
    def forward(b: dict) -> np.ndarray:
        net.eval()
        return net(**{k: torch.from_numpy(b[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}).logits.numpy()

    return forward
