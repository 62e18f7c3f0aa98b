"""Edge-optimization toolchain: fine-tune, merge, export, quantize, validate, package."""

VERSION = "0.1.0"  # the one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic)
__version__ = VERSION
