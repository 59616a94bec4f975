"""The kernels' own tile and chunk sizes, read from their source without importing them.

Importing a kernel module imports torch and Triton (seconds); the planner answers in well under
that, so it reads the module-level integer constants straight from the source files of
``qwenlong.kernels`` (``tests/test_plan.py`` checks they equal the imported values). A renamed
constant fails here with its name, rather than the planner silently using a stale number.
"""

from __future__ import annotations

import ast
import importlib.util
from functools import cache
from pathlib import Path


@cache
def _constants(module: str) -> dict[str, int]:
    spec = importlib.util.find_spec("qwenlong.kernels")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwenlong.kernels is not installed")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*module.split(".")).with_suffix(".py")
    values = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and type(node.value.value) is int:
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values[target.id] = node.value.value
    return values


def kernel_constant(module: str, name: str) -> int:
    """Integer constant ``name`` of ``qwenlong.kernels.<module>`` (e.g. ``"logprobs.chunked"``, ``"TOKEN_CHUNK"``)."""
    values = _constants(module)
    if name not in values:
        raise RuntimeError(f"qwenlong.kernels.{module} no longer defines the integer {name}; update qwenlong.plan")
    return values[name]
