"""Work meters: FLOPs, bytes and programs the Triton kernels issue, counted under the interpreter.

``python -m benchmarks --only work`` runs every meter listed in :data:`METERS` (each a module with a
``main(argv)`` like the other benchmarks). The counting hook is :mod:`benchmarks.work.counting`.
Meters need no GPU; when this process already defined the kernels for a GPU, they run in a child
process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

METERS = {
    "lm-head": "benchmarks.work.lm_head",
    "attention": "benchmarks.work.attention",
}
ROOT = Path(__file__).resolve().parent.parent.parent


def _kernels_defined_compiled() -> bool:
    """True when qwenlong.kernels was imported in this process without the interpreter."""
    if "qwenlong.kernels" not in sys.modules:
        return False
    import triton

    return not triton.knobs.runtime.interpret


def main(argv: list[str] | None = None) -> None:
    argv = list(argv or [])
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or _kernels_defined_compiled():
        env = os.environ | {"TRITON_INTERPRET": "1"}
        env.pop("QWENLONG_BACKEND", None)
        subprocess.run([sys.executable, "-c", "import sys; from benchmarks.work import main; main(sys.argv[1:])",
                        *argv], cwd=ROOT, env=env, check=True)
        return
    failed = []
    for name, module in METERS.items():
        if importlib.util.find_spec(module) is None:
            print(f"--- work meter {name}: not present, skipped")
            continue
        print(f"--- work meter {name}", flush=True)
        try:
            importlib.import_module(module).main(argv)
        except Exception as error:  # one broken meter must not hide the other's results
            print(f"--- work meter {name} failed: {error!r}", file=sys.stderr)
            failed.append(name)
    if failed:
        raise RuntimeError(f"work meters failed: {', '.join(failed)}")
