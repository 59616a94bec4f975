"""The interpreter's bf16 fix: bf16 kernels match an fp32 reference rounded to bf16.

Each check runs a kernel in a fresh subprocess twice, with and without the fix, so the
test proves both that the fix is needed (the unfixed run is wrong) and that it works.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

KERNEL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    if sys.argv[1] == "fixed":
        from qwenlong.kernels.utils.interpreter import install_bf16_fix
        install_bf16_fix()
    import torch, triton
    import triton.language as tl

    @triton.jit
    def ops(x_ptr, y_ptr, out_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        idx = r[:, None] * N + r[None, :]
        x = tl.load(x_ptr + idx)
        y = tl.load(y_ptr + idx)
        tl.store(out_ptr + idx, tl.dot(x, y).to(tl.bfloat16))
        tl.store(out_ptr + N * N + idx, x + y)
        tl.store(out_ptr + 2 * N * N + idx, x * y - x)
        tl.store(out_ptr + 3 * N * N + idx, -x)
        tl.store(out_ptr + 4 * N * N + idx, tl.where(x > y, x, y))
        tl.store(out_ptr + 5 * N * N + r, tl.sum(x, axis=1))
        tl.store(out_ptr + 5 * N * N + N + r, tl.max(-x, axis=1))

    torch.manual_seed(int(sys.argv[2]))
    N = 16
    x = torch.randn(N, N).bfloat16()
    y = torch.randn(N, N).bfloat16()
    out = torch.full((5 * N * N + 2 * N,), float("nan"), dtype=torch.bfloat16)
    ops[(1,)](x, y, out, N)
    xf, yf = x.float(), y.float()
    expected = [xf @ yf, xf + yf, xf * yf - xf, -xf, torch.maximum(xf, yf), xf.sum(1), (-xf).max(1).values]
    got = [out[i * N * N:(i + 1) * N * N].view(N, N).float() for i in range(5)]
    got += [out[5 * N * N:5 * N * N + N].float(), out[5 * N * N + N:].float()]
    worst = 0.0
    for g, e in zip(got, expected):
        if not torch.isfinite(g).all():
            worst = float("inf")
            break
        # bf16 rounding of the result (and of the intermediate x*y) bounds the error
        worst = max(worst, float(((g - e).abs() / (e.abs() + 1.0)).max()))
    print(worst)
    """
)


def _worst_error(mode: str, seed: int) -> float:
    result = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT, mode, str(seed)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_fix_is_needed_and_works(seed):
    assert _worst_error("raw", seed) > 0.5, "the unfixed interpreter computed bf16 correctly: fix obsolete?"
    assert _worst_error("fixed", seed) < 0.04


def test_bit_conversions_round_trip():
    import numpy as np
    import torch

    from qwenlong.kernels.utils.interpreter import bf16_bits_to_fp32, fp32_to_bf16_bits

    values = torch.randn(1000).bfloat16()
    bits = values.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bf16_bits_to_fp32(bits), values.float().numpy())
    wide = torch.randn(1000)
    assert np.array_equal(fp32_to_bf16_bits(wide.numpy()), wide.bfloat16().view(torch.int16).numpy().view(np.uint16))


PACKAGE_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["QWENLONG_BACKEND"] = "triton"
    import torch
    from qwenlong.kernels import linear_logprobs
    from qwenlong.kernels.logprobs.reference import reference_linear_logprobs
    from qwenlong.kernels.utils import interpreter

    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(20, 32, generator=gen).bfloat16()
    weight = (torch.randn(150, 32, generator=gen) / 32**0.5).bfloat16()
    targets = torch.randint(0, 150, (20,), generator=gen)
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
    ref_logp, ref_entropy = reference_linear_logprobs(hidden, weight, targets, return_entropy=True)
    error = max(float((logp.double() - ref_logp).abs().max()), float((entropy.double() - ref_entropy).abs().max()))
    print(interpreter._INSTALLED, error)
    """
)


def test_package_installs_the_fix_outside_pytest():
    """A plain process (no conftest) that runs a bf16 op on the interpreter gets the fix from the package."""
    result = subprocess.run([sys.executable, "-c", PACKAGE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    installed, error = result.stdout.split()
    assert installed == "True" and float(error) < 2e-3
