"""bench_logprobs: the GPU benchmark's code runs end to end at tiny sizes on CPU (``--device cpu --speed``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_speed_mode_runs_every_op_and_batch_on_cpu(tmp_path):
    env = os.environ | {"TRITON_INTERPRET": "0"}
    env.pop("QWENLONG_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_logprobs", "--device", "cpu", "--speed",
                           "--repeats", "1", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*-logprobs-speed-smoke.json")).read_text())
    measured = [row for row in result["rows"] if "status" not in row]
    assert {(row["op"], row["batch"]) for row in measured if row["variant"] == "chunked torch (ours)"} == {
        (op, batch) for op in ("logprobs+entropy", "cross-entropy", "grpo_loss")
        for batch in ("valid rows alone", "all valid", "RL-shaped")}
    for row in measured:
        assert row["fwd+bwd ms"] > 0 and row["useful TFLOP/s"] > 0 and row["peak MiB"] >= 0, row
    for row in result["rows"]:
        assert "status" not in row or row["status"].startswith(("not available", "OOM")), row
    assert any("RL-shaped batch" in note for note in result["notes"])
