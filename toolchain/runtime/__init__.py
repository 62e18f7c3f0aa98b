"""The torch-free part of the toolchain: what a device needs to validate an artifact.

Nothing under toolchain.runtime may import torch or transformers (tests/test_runtime_torch_free.py checks it).
"""
