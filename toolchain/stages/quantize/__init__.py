"""Stage 4, quantization, by what builds a target (config/targets.py `built_by`): nbits.py (cpu-fp32/int4/int8,
MatMulNBits), qdq.py (npu-qdq), builder.py (cuda/dml/webgpu, the onnxruntime-genai builder) and dynamic.py
(encoder int8)."""
