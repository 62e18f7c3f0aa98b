"""Does a quantized model decode through its KV cache like the fp32 export? onnxruntime directly, no GenAI.

    .venv/bin/python bench/qdq_decode.py <fp32 export folder> <quantized folder with eval.jsonl> [--steps 12]

(a) the first held-out prompt in one pass: top-1 agreement over its positions; (b) then one-token decode steps, each
model with its own KV cache, both fed the fp32 model's greedy token (so a near-tie cannot cascade): top-1 agreement
and the max logit error per step; (c) the same positions as one full pass with no cache. A model whose (b) fails
while (a) and (c) pass has a broken decode path (npu-qdq once quantized its KV cache on a [0, 0] calibration range).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp32")
    ap.add_argument("quantized")
    ap.add_argument("--steps", type=int, default=12)
    a = ap.parse_args()
    dec = json.loads((Path(a.fp32) / "genai_config.json").read_text())["model"]["decoder"]
    layers, shape = dec["num_hidden_layers"], (1, dec["num_key_value_heads"], 0, dec["head_size"])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = [ort.InferenceSession(str(Path(d) / "model.onnx"), so, providers=["CPUExecutionProvider"])
            for d in (a.fp32, a.quantized)]

    def run(s, ids, past, total):
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64),
                **{f"past_key_values.{i}.{kv}": past[2 * i + j] for i in range(layers)
                   for j, kv in enumerate(("key", "value"))}}
        out = dict(zip([o.name for o in s.get_outputs()], s.run(None, feed)))
        return out["logits"][0], [out[f"present.{i}.{kv}"] for i in range(layers) for kv in ("key", "value")]

    prompt = json.loads((Path(a.quantized) / "eval.jsonl").read_text().splitlines()[0])["prompt_ids"]
    empty = [np.zeros(shape, np.float32)] * (2 * layers)
    (lf, pf), (lq, pq) = (run(s, prompt, empty, len(prompt)) for s in sess)
    print(f"(a) prompt pass, {len(prompt)} tokens: top-1 agreement {np.mean(lf.argmax(-1) == lq.argmax(-1)):.3f}")
    toks, agree, err = [int(lf[-1].argmax())], [], []
    for t in range(a.steps):
        n = len(prompt) + t + 1
        (lf, pf), (lq, pq) = run(sess[0], toks[-1:], pf, n), run(sess[1], toks[-1:], pq, n)
        agree.append(int(lf[-1].argmax() == lq[-1].argmax()))
        err.append(float(np.abs(lf[-1] - lq[-1]).max()))
        toks.append(int(lf[-1].argmax()))
    print(f"(b) {a.steps} decode steps through the KV cache: {sum(agree)}/{a.steps} agree, max logit error "
          f"{min(err):.2f}-{max(err):.2f}")
    full = prompt + toks[:-1]
    ff, fq = (run(s, full, empty, len(full))[0][len(prompt):] for s in sess)
    print(f"(c) the same positions in one full pass: {int(np.sum(ff.argmax(-1) == fq.argmax(-1)))}/{a.steps} agree")


if __name__ == "__main__":
    main()
