"""The compiled extension: ``_host`` (C++, always built) and ``_cuda`` (CUDA, optional).

``host`` / ``cuda`` are the loaded modules or None; ``host_error`` / ``cuda_error`` say why
one is missing. Importing this package never fails, so pure-Python fallbacks can decide.
"""

from __future__ import annotations

import importlib


def _load(name: str):
    try:
        if name == "_cuda":
            import torch  # noqa: F401  (the CUDA part links against libtorch: load it first)
        return importlib.import_module(f"{__name__}.{name}"), None
    except ImportError as exc:  # not built, or built against another torch
        return None, f"{type(exc).__name__}: {exc}"


host, host_error = _load("_host")
cuda, cuda_error = _load("_cuda")

__all__ = ["host", "host_error", "cuda", "cuda_error"]
