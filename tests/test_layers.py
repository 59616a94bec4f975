"""Imports point down only: read from the source (every import, function-level ones included).

training layer (qwenlong.<package>, a DAG among themselves) -> qwenlong.integrations -> qwenlong.kernels
(source: kernels/) -> qwenlong._C.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the training layer reached from an integration, each for a reason: verl and TRL load a reward function by
# module path, so the adapters' modules hand our reward over (imported when called, not at module load)
ALLOWED_UP = {("qwenlong/integrations/verl.py", "qwenlong.rewards")}


def unit(module: str) -> str | None:
    """The layer unit a dotted module name belongs to (None: not ours)."""
    parts = module.split(".")
    if parts[0] != "qwenlong" or len(parts) == 1:
        return None
    return "kernels" if parts[1] == "kernels" else f"qwenlong.{parts[1]}"


def source_unit(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "kernels":
        return "kernels"
    return f"qwenlong.{Path(rel.parts[1]).stem}"


def imports() -> list[tuple[str, str, str]]:
    """(file, importing unit, imported unit) for every import of one of our modules in another unit."""
    found = []
    for path in [*ROOT.glob("qwenlong/**/*.py"), *ROOT.glob("kernels/**/*.py")]:
        here = source_unit(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                there = unit(name)
                if there is not None and there != here:
                    found.append((str(path.relative_to(ROOT)), here, there))
    return found


def test_kernels_import_only_the_extension():
    bad = {(f, there) for f, here, there in imports() if here == "kernels" and there != "qwenlong._C"}
    assert not bad, f"qwenlong.kernels must import torch, triton and qwenlong._C only: {sorted(bad)}"


def test_integrations_import_only_kernels():
    bad = {(f, there) for f, here, there in imports()
           if here == "qwenlong.integrations" and there not in ("kernels", "qwenlong._C")} - ALLOWED_UP
    assert not bad, f"qwenlong.integrations reaches up into the training layer: {sorted(bad)}"


def test_nothing_below_imports_the_training_layer_and_the_training_layer_has_no_cycle():
    below = {"kernels", "qwenlong._C", "qwenlong.integrations"}
    edges: dict[str, set[str]] = {}
    for f, here, there in imports():
        if here in below or (f, there) in ALLOWED_UP:
            continue
        edges.setdefault(here, set()).add(there)
    # a cycle among the training layer's packages: some package reaches itself through its imports
    for start in edges:
        seen, stack = set(), list(edges[start])
        while stack:
            node = stack.pop()
            assert node != start, f"{start} imports itself through {sorted(edges[start])}: a cycle"
            if node not in seen:
                seen.add(node)
                stack.extend(edges.get(node, ()))
