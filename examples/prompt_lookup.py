"""Greedy generation with prompt-lookup decoding, from the torch-free runtime that `[runtime]` installs.

    python examples/prompt_lookup.py [ARTIFACT_FOLDER] [NEW_TOKENS]  # defaults: cpu-int4 64

Drafts of up to K tokens (here lookup=3) are copied from earlier in the context where its last 3-4 tokens occurred
before, and one forward pass checks a whole draft. The tokens are greedy's (in an int4 or int8 model a near-tie can
go the other way). It pays where the output repeats the context (extraction, quoting, edits); on short chat answers
it is about even (docs/benchmarks.md). It needs a model with logits for every position, i.e. not one built with
`quantize: {prune_lm_head: true}`.
"""
import sys

from toolchain.runtime import genai

folder = sys.argv[1] if len(sys.argv) > 1 else "cpu-int4"
new_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 64

model, tok = genai.load(folder)
ids = [int(x) for x in tok.encode("Book 2 seats in Oslo for 3 May. Name: Ana Lee. Book 2 seats in")]
g = genai.generate(model, ids, new_tokens, lookup=3, eos=genai.eos_ids(tok))
print(tok.decode(g.tokens), f"{g.decode_tok_s:.0f} tok/s, {(len(g.tokens) - 1) / max(g.steps, 1):.2f} tokens per pass")
