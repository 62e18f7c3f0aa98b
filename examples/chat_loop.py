"""Chat with an artifact through onnxruntime-genai alone, streaming the answer token by token. No torch.

    python examples/chat_loop.py [ARTIFACT_FOLDER] [MAX_LENGTH]      # defaults: cpu-int4 256

ARTIFACT_FOLDER is a decoder artifact (the cpu-int4 folder `make edge` writes, copied to the device);
MAX_LENGTH caps prompt plus answer in tokens. Needs only `pip install 'edge-toolchain[runtime]'`
(or plain `pip install onnxruntime-genai`).
"""
import json
import sys

import onnxruntime_genai as og

folder = sys.argv[1] if len(sys.argv) > 1 else "cpu-int4"
max_length = int(sys.argv[2]) if len(sys.argv) > 2 else 256

model = og.Model(folder)
tok = og.Tokenizer(model)
messages = [{"role": "system", "content": 'Extract the booking as one line of JSON with keys "name", "city", "qty", '
                                          '"date" (MM-DD). No other text.'},
            {"role": "user", "content": "Book 2 seats in Oslo for 3 May. Name: Ana Lee."}]
prompt = tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
params = og.GeneratorParams(model)
params.set_search_options(max_length=max_length, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(tok.encode(prompt))
stream = tok.create_stream()
while not gen.is_done():
    gen.generate_next_token()
    print(stream.decode(gen.get_next_tokens()[0]), end="", flush=True)
print()
