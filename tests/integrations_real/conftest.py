"""Tests against the real verl, OpenRLHF and TRL (each skipped where its library is not installed).

OpenRLHF imports flash-attn at module load; where OpenRLHF is installed without it (a CPU
venv), the import stand-in under ``flash_attn_standin/`` is put on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("openrlhf") is not None and importlib.util.find_spec("flash_attn") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "flash_attn_standin"))
