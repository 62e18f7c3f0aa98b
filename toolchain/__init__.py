"""Edge-optimization toolchain: fine-tune, merge, export, quantize, validate, package."""
