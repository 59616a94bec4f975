"""bench_logprobs: the GPU benchmark's code runs end to end at tiny sizes on CPU (``--device cpu --speed``)."""

from __future__ import annotations

import importlib
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
        assert row["extra MiB"] <= row["peak MiB"] and "extra / logits tensor" in row, row
    for row in result["rows"]:
        assert "status" not in row or row["status"].startswith(("not available", "OOM")), row
    assert any("RL-shaped batch" in note for note in result["notes"])


def test_grad_in_forward_variant_runs_the_option(monkeypatch):
    """The benchmark's grad-in-forward variant (under the interpreter, tiny shapes) gives the plain fused variant's
    loss and gradients, for the scalar losses; log-probs + entropy has none."""
    import torch

    sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package
    from benchmarks import bench_logprobs
    from qwenlong.kernels.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("runs the Triton kernels under TRITON_INTERPRET=1")
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")  # the variants set it: restored after the test
    kernels = importlib.import_module("qwenlong.kernels.logprobs.linear_logprobs")
    fused_calls, fused = [], kernels._TritonFusedLoss.apply
    monkeypatch.setattr(kernels._TritonFusedLoss, "apply", lambda *args: fused_calls.append(1) or fused(*args))
    assert bench_logprobs.gpu_variants("logprobs+entropy", "cpu")["fused triton, grad in forward (ours)"].startswith(
        "not available")
    for op in ("cross-entropy", "grpo_loss"):
        variants = bench_logprobs.gpu_variants(op, "cpu")
        hidden, weight, targets = bench_logprobs.make_inputs(48, 16, 200, torch.float32, "cpu", True, valid=20)
        results = []
        for name, made_in_forward in (("fused triton (ours)", 0), ("fused triton, grad in forward (ours)", 1)):
            fused_calls.clear()
            loss = variants[name](hidden, weight, targets)
            assert len(fused_calls) == made_in_forward, name
            results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
        for plain, in_forward in zip(*results, strict=True):
            torch.testing.assert_close(in_forward, plain, atol=1e-5, rtol=1e-4)


def test_speed_plan_measures_the_smallest_batches_of_every_op_first():
    """A spent --budget cuts the larger T: every (op, batch) at the smallest T comes before any at a larger T,
    log-probs + entropy first, each op's all-valid batch before its RL-shaped one and that before its valid rows
    alone; every pair is measured once."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_logprobs

    batches = [("valid rows alone", 4096, 4096), ("all valid", 32768, 32768), ("RL-shaped", 32768, 4096),
               ("all valid", 122880, 122880), ("RL-shaped", 122880, 4096)]
    plan = bench_logprobs.speed_plan(batches)
    assert sorted(plan) == sorted((op, batch) for op in bench_logprobs.OPS for batch in batches)
    first = [(op, label) for op, (label, tokens, _) in plan[:9]]
    assert first == [(op, label) for op in ("logprobs+entropy", "cross-entropy", "grpo_loss")
                     for label in ("all valid", "RL-shaped", "valid rows alone")]
    assert all(tokens == 122880 for _, (_, tokens, _) in plan[9:])


def test_secondary_variants_are_measured_after_every_other_row():
    """The materialized logits and our PyTorch path (seconds a run at T = 32K on a GPU) come after the fused
    kernels and the peers of every (op, batch), which keep the plan's order; every row is measured once."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_logprobs

    batches = [("valid rows alone", 4096, 4096), ("all valid", 32768, 32768), ("RL-shaped", 32768, 4096)]
    names = list(bench_logprobs.gpu_variants("cross-entropy", "cpu"))
    order = bench_logprobs.measurement_order(names, batches)
    assert sorted(order) == sorted((op, batch, name) for op, batch in bench_logprobs.speed_plan(batches)
                                   for name in names)
    secondary = [i for i, (_, _, name) in enumerate(order) if name in bench_logprobs.SECONDARY_VARIANTS]
    assert secondary and min(secondary) == len(order) - len(secondary)
    primary_pairs = [(op, batch) for op, batch, name in order if name == "fused triton (ours)"]
    assert primary_pairs == bench_logprobs.speed_plan(batches)


def test_time_ms_frees_each_runs_inputs_before_making_the_next():
    """Each timed run's inputs (at T = 120K on the GPU: a 152K x 5120 weight, its gradient, the hidden states) are
    freed before ``setup`` makes the next run's: else two runs' inputs live at once, and a row that fit in its
    peak-memory run ran out of memory in its timed runs (reported OOM)."""
    import weakref

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import time_ms

    class Inputs(list):
        pass

    previous, alive_at_setup = [], []

    def setup():
        alive_at_setup.append(any(ref() is not None for ref in previous))
        inputs = Inputs([1.0])
        previous.append(weakref.ref(inputs))
        return inputs

    time_ms(lambda x: x * 2, setup=setup, warmup=1, repeats=3)
    assert len(alive_at_setup) == 4 and not any(alive_at_setup), alive_at_setup
