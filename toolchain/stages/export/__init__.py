"""Stage 3, ONNX export: decoder.py (onnxruntime-genai builder or Optimum, with logit parity against torch) and
encoder.py (Optimum text/token classification)."""
