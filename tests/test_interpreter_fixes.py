"""The interpreter fixes: bf16 kernels match an fp32 reference rounded to bf16, and descriptor
reductions (``desc.atomic_add`` and the rest) run and match a float64 reference.

The bf16 check runs a kernel in a fresh subprocess twice, with and without the fix, so the
test proves both that the fix is needed (the unfixed run is wrong) and that it works; the
reduction check proves the same with a kernel the unfixed interpreter cannot run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

KERNEL_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    if sys.argv[1] == "fixed":
        from qwenlong.kernels.utils.interpreter import install_interpreter_fixes
        install_interpreter_fixes()
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


CAST_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    if sys.argv[1] == "fixed":
        from qwenlong.kernels.utils.interpreter import install_interpreter_fixes
        install_interpreter_fixes()
    import torch, triton
    import triton.language as tl

    @triton.jit
    def casts(x_ptr, b_ptr, out_ptr, wide_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        x = tl.load(x_ptr + r)  # fp32
        b = tl.load(b_ptr + r)  # bf16
        tl.store(out_ptr + r, x.to(tl.bfloat16))  # an explicit conversion
        tl.store(out_ptr + N + r, x)  # the one a store into a bf16 pointer makes
        tl.store(out_ptr + 2 * N + r, r.to(tl.bfloat16))  # from an integer
        tl.store(out_ptr + 3 * N + r, (r % 2 == 0).to(tl.bfloat16))  # from a bool
        tl.store(out_ptr + 4 * N + r, tl.clamp(b, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL))
        tl.store(wide_ptr + r, b.to(tl.float32))
        tl.store(wide_ptr + N + r, b.to(tl.int32).to(tl.float32))  # to an integer: toward zero

    torch.manual_seed(int(sys.argv[2]))
    N = 64
    x = torch.randn(N) * 100
    b = (torch.randn(N) * 3).bfloat16()
    out = torch.empty(5 * N, dtype=torch.bfloat16)
    wide = torch.empty(2 * N)
    casts[(1,)](x, b, out, wide, N)
    r = torch.arange(N)
    expected = torch.cat([x.bfloat16(), x.bfloat16(), r.bfloat16(), (r % 2 == 0).bfloat16(), b.clamp(-1, 1)])
    print(torch.equal(out, expected) and torch.equal(wide, torch.cat([b.float(), b.float().trunc()])))
    """
)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_conversions_round_to_nearest_even(seed):
    """Conversions into bf16 (explicit, by a store, from integers and bools) and tl.clamp give the bits the GPU
    gives (torch's round to nearest even); the unfixed interpreter truncates fp32 and writes integers as bits."""
    def run(mode):
        result = subprocess.run([sys.executable, "-c", CAST_SCRIPT, mode, str(seed)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.split()[-1]

    assert run("raw") == "False", "the unfixed interpreter converts to bf16 correctly: fix obsolete?"
    assert run("fixed") == "True"


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


REDUCE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import triton
    import triton.language as tl
    if sys.argv[1] == "fixed":
        from qwenlong.kernels.utils.interpreter import install_interpreter_fixes
        install_interpreter_fixes()
    import torch

    @triton.jit
    def add_block(X):
        desc = tl.make_tensor_descriptor(X, shape=[4, 8], strides=[8, 1], block_shape=[4, 8])
        desc.atomic_add([0, 0], tl.full([4, 8], 1.0, tl.float32))

    x = torch.zeros(4, 8)
    add_block[(1,)](x)
    print(float(x.sum()))
    """
)


def test_descriptor_reduction_fix_is_needed():
    raw = subprocess.run([sys.executable, "-c", REDUCE_SCRIPT, "raw"], capture_output=True, text=True, timeout=300)
    assert raw.returncode != 0 and "create_descriptor_reduce" in raw.stderr, (
        "the unfixed interpreter ran a descriptor reduction: fix obsolete?"
    )
    fixed = subprocess.run([sys.executable, "-c", REDUCE_SCRIPT, "fixed"], capture_output=True, text=True, timeout=300)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert float(fixed.stdout.strip()) == 32.0


def _reduce_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def reduce_blocks(X, V, rows, cols, stride, KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program p combines V[p] (a BLOCK_R x BLOCK_C block) into X at rows [p, p + BLOCK_R), columns
        [p % 2 * BLOCK_C, ...): blocks overlap each other and overhang X's last rows and columns."""
        p = tl.program_id(0)
        r, c = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_C)
        value = tl.load(V + p * BLOCK_R * BLOCK_C + r[:, None] * BLOCK_C + c[None, :])
        desc = tl.make_tensor_descriptor(X, shape=[rows, cols], strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_C])
        start = [p, p % 2 * BLOCK_C]
        if KIND == "add":
            desc.atomic_add(start, value)
        elif KIND == "min":
            desc.atomic_min(start, value)
        elif KIND == "max":
            desc.atomic_max(start, value)
        elif KIND == "and":
            desc.atomic_and(start, value)
        elif KIND == "or":
            desc.atomic_or(start, value)
        else:
            desc.atomic_xor(start, value)

    return reduce_blocks


REDUCE_CASES = {  # kind: (dtype, combine)
    "add": (torch.float32, lambda a, b: a + b),
    "min": (torch.int32, torch.minimum),
    "max": (torch.int32, torch.maximum),
    "and": (torch.int32, torch.bitwise_and),
    "or": (torch.int32, torch.bitwise_or),
    "xor": (torch.int32, torch.bitwise_xor),
}


@pytest.mark.parametrize(
    "kind,dtype",
    [(kind, dtype) for kind, (dtype, _) in REDUCE_CASES.items()] + [("add", torch.bfloat16)],
    ids=lambda value: str(value).removeprefix("torch."),
)
def test_descriptor_reductions_match_a_reference(kind, dtype):
    """Every reduction kind on overlapping blocks that overhang the descriptor's last rows and columns: the same
    as combining each block's in-bounds part in program order (float64 for the fp32 sum; bf16, rounded after
    each block, as the fixed interpreter combines); nothing outside the descriptor's shape changes."""
    combine = REDUCE_CASES[kind][1]
    gen = torch.Generator().manual_seed(len(kind))
    rows, cols, width, block_r, block_c, programs = 11, 10, 16, 4, 8, 9
    if dtype.is_floating_point:
        start = torch.randn(rows, width, generator=gen).to(dtype)
        values = torch.randn(programs, block_r, block_c, generator=gen).to(dtype)
    else:
        start = torch.randint(-1000, 1000, (rows, width), generator=gen, dtype=dtype)
        values = torch.randint(-1000, 1000, (programs, block_r, block_c), generator=gen, dtype=dtype)
    # the descriptor sees the first `cols` of each row of a wider buffer: the columns past them must not change
    buffer = start.clone()
    view = buffer[:, :cols]
    exact = dtype == torch.float32
    expected = start.double() if exact else start.clone()
    for p in range(programs):
        r0, c0 = p, p % 2 * block_c
        r1, c1 = min(r0 + block_r, rows), min(c0 + block_c, cols)
        block = values[p, : r1 - r0, : c1 - c0]
        if dtype == torch.bfloat16:
            expected[r0:r1, c0:c1] = combine(expected[r0:r1, c0:c1].float(), block.float()).bfloat16()
        else:
            expected[r0:r1, c0:c1] = combine(expected[r0:r1, c0:c1], block.double() if exact else block)
    _reduce_kernel()[(programs,)](view, values, rows, cols, view.stride(0), KIND=kind, BLOCK_R=block_r, BLOCK_C=block_c)
    if exact:
        torch.testing.assert_close(buffer.double(), expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(buffer, expected)


def test_one_element_blocks_index_whatever_their_rank():
    """A loop bound computed in a kernel is a one-element block; Triton before 3.9 converted it with ``int()`` of
    the raw array, which numpy 2.4 refuses for a 1-d array: the fix reads any rank."""
    from types import SimpleNamespace

    import numpy as np

    from qwenlong.kernels.utils.interpreter import _with_scalar_index

    attrs = {}
    scope = SimpleNamespace(set_attr=lambda obj, name, value: attrs.__setitem__(name, value))
    _with_scalar_index(lambda tensor, scope: None)(object, scope)
    for data in (np.array(7), np.array([7], dtype=np.int32), np.array([[7]], dtype=np.int64)):
        block = SimpleNamespace(handle=SimpleNamespace(data=data))
        assert attrs["__index__"](block) == 7 and isinstance(attrs["__index__"](block), int)


def test_one_element_block_index_fix_takes_triton_3_4s_one_argument_patch():
    """Triton 3.4 / 3.5 call ``_patch_lang_tensor(tensor)`` (3.6 added the patch scope): the package supports
    3.4 on, and the fix's two-argument wrapper made the first interpreted kernel raise a TypeError there."""
    from types import SimpleNamespace

    import numpy as np

    from qwenlong.kernels.utils.interpreter import _with_scalar_index

    patched_by_triton = []

    class Tensor:
        pass

    _with_scalar_index(lambda tensor: patched_by_triton.append(tensor))(Tensor)
    assert patched_by_triton == [Tensor]
    block = Tensor()
    for data in (np.array(5), np.array([5], dtype=np.int32), np.array([[5]], dtype=np.int64)):
        block.handle = SimpleNamespace(data=data)
        assert block.__index__() == 5 and isinstance(block.__index__(), int)
