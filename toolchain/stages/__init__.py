"""The stages of the chain, one module or small package each, in the order pipeline.py runs them:

    finetune/   PEFT methods, batching, checkpoints, the DeepSpeed launch; decoder.py and encoder.py entry points
    merge.py    the adapter into the full-precision base, with a logit check
    export/     decoder.py (onnxruntime-genai builder or Optimum, parity with torch), encoder.py (Optimum)
    reference.py  the held-out split as the device sees it, and the fp32 ONNX model's figures on it
    quantize/   nbits.py (MatMulNBits int4/int8), qdq.py (static QDQ for NPUs), builder.py (GPU targets),
                dynamic.py (encoder int8)
    package.py  the artifact folder and its manifest

A stage takes paths and the resolved config objects and writes one folder atomically; none imports the pipeline
or the engine (tests/test_layout.py checks it).
"""
