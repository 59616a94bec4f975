"""bench_attention: the GPU run's variants of our kernel run the backward they are named for."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_deterministic_false_variant_runs_the_atomic_backward(monkeypatch):
    """The benchmark's ``deterministic=False`` row (the one comparable to FlashAttention's backward) runs the atomic
    5-GEMM backward, its default row the deterministic one; both give the same output and gradients within
    fp32 summation order (under the interpreter, tiny packed shapes)."""
    sys.path.insert(0, str(ROOT))  # benchmarks/ is not an installed package
    from benchmarks import bench_attention
    from qwenlong.kernels.backend import interpreter_enabled

    if not interpreter_enabled():
        pytest.skip("runs the Triton kernels under TRITON_INTERPRET=1")
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    varlen = importlib.import_module("qwenlong.kernels.attention.varlen")
    asked, backward = [], varlen._triton_backward
    monkeypatch.setattr(varlen, "_triton_backward", lambda *args: asked.append(args[-1]) or backward(*args))
    variants = bench_attention.gpu_variants()
    lengths = [37, 1, 70]
    q, k, v, cu = bench_attention.make_inputs(lengths, 4, 2, 64, torch.float32, "cpu")[:4]
    results = []
    for name, deterministic in (("qwenlong (Triton)", True), ("qwenlong (Triton, deterministic=False)", False)):
        asked.clear()
        out = variants[name](q, k, v, cu, max(lengths))
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out, (q, k, v), do)
        assert asked == [deterministic], name
        results.append((out, *grads))
    for default, atomic in zip(*results, strict=True):
        torch.testing.assert_close(atomic, default, atol=1e-5, rtol=1e-5)


def test_a_row_that_fails_is_reported_and_the_others_still_run():
    """One variant's failure is that row's status, whatever it raises (a peer's API that moved raises TypeError, a
    Triton kernel that does not fit the GPU OutOfResources, an assert AssertionError, none of them a RuntimeError,
    some with no message): it must not end the benchmark, which would then write no results at all."""
    sys.path.insert(0, str(ROOT))
    from triton.runtime.errors import OutOfResources

    from benchmarks import bench_attention

    def raising(error):
        def run(q, k, v, cu, m):
            raise error

        return run

    variants = {"moved API": raising(TypeError("flash_attn_varlen_func() got an unexpected keyword argument")),
                "too big a tile": raising(OutOfResources(300_000, 232_448, "shared memory")),
                "no message": raising(AssertionError()),
                "naive (materialized)": bench_attention.naive()}
    rows = bench_attention.bench(variants, [128], ["docs<=8K"], 2, 1, 16, torch.float32, "cpu", repeats=1)
    status = {row["variant"]: row["status"] for row in rows}
    assert status["naive (materialized)"] == "ok", rows
    assert status["moved API"].startswith("not available: TypeError: flash_attn_varlen_func()"), rows
    assert status["too big a tile"].startswith("not available: OutOfResources"), rows
    assert status["no message"] == "not available: AssertionError", rows
