"""qwenlong: long-context reasoning RL (the QwenLong-L1 recipe) on fused kernels.

Importing this package is cheap: submodules (``qwenlong.kernels``, ``qwenlong.trainers``,
...) load on first use, so ``import qwenlong`` pulls in neither torch nor transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"kernels", "env", "cli", "config", "data", "rewards", "trainers", "rollout", "eval",
               "algorithms", "integrations", "models", "distributed"}


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'qwenlong' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES)
