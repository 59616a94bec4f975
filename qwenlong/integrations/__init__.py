"""Bridges from third-party libraries (transformers, ...) to qwenlong kernels."""
