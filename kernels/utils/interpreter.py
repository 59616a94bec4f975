"""A fix for bfloat16 arithmetic in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter stores bf16 values as their raw ``uint16`` bits and hands those bits to
numpy: ``a + b``, ``tl.dot``, ``tl.sum``, comparisons and ``tl.exp`` then compute on
integers, not on the numbers they encode. :func:`install_bf16_fix` wraps the interpreter's
arithmetic so that every bf16 operand is widened to fp32, the op runs in fp32, and a bf16
result is rounded back (round-to-nearest-even, like the hardware). Pure data movement
(loads, stores, ``where``, reshapes) already works on the bits and is left alone.

Only the interpreter is touched; compiled GPU kernels are unaffected.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

_INSTALLED = False


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """Decode bf16 stored as uint16 bits into float32 values (exact)."""
    return (np.asarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float values to bf16 (nearest even) and return their uint16 bits."""
    as_tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return as_tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _is_bf16(handle) -> bool:
    import triton.language as tl

    if not hasattr(handle, "data") or not hasattr(handle, "dtype"):
        return False  # a numpy ufunc or flag passed beside the operands
    return handle.dtype.scalar == tl.bfloat16 and handle.data.dtype == np.uint16


def _widen(handle):
    from triton.runtime.interpreter import TensorHandle

    if _is_bf16(handle):
        import triton.language as tl

        return TensorHandle(bf16_bits_to_fp32(handle.data), tl.float32), True
    return handle, False


def _narrow(result, was_bf16: bool):
    """Round a float32 result computed for a bf16 op back to bf16 bits."""
    import triton.language as tl
    from triton.runtime.interpreter import TensorHandle

    if not was_bf16 or result.data.dtype == np.bool_:
        return result
    return TensorHandle(fp32_to_bf16_bits(result.data), tl.bfloat16)


def install_bf16_fix_when_interpreting() -> bool:
    """Install the fix when ``TRITON_INTERPRET`` is on (``@triton.jit`` functions defined now will run
    on the interpreter). Returns whether it is installed."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return _INSTALLED
    return install_bf16_fix()


def install_bf16_fix() -> bool:
    """Patch the Triton interpreter so bf16 arithmetic computes on values, not bits.

    Idempotent. Returns True when the patch is (now) installed, False when Triton's
    interpreter module is not importable.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # pragma: no cover - triton without interpreter
        return False

    builder = interp.InterpreterBuilder

    def elementwise(original):
        @functools.wraps(original)
        def patched(self, *handles, **kwargs):
            widened = [_widen(h) for h in handles]
            any_bf16 = any(flag for _, flag in widened)
            result = original(self, *(h for h, _ in widened), **kwargs)
            return _narrow(result, any_bf16)

        return patched

    builder.binary_op = elementwise(builder.binary_op)  # every create_f*/cmp routes here

    original_unary = builder.unary_op

    def unary_op(self, arg, op):
        widened, was_bf16 = _widen(arg)
        return _narrow(original_unary(self, widened, op), was_bf16)

    builder.unary_op = unary_op

    for name in ("create_fma", "create_rsqrt", "create_erf"):
        setattr(builder, name, elementwise(getattr(builder, name)))

    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        d_wide, d_bf16 = _widen(d)
        result = original_dot(self, _widen(a)[0], _widen(b)[0], d_wide, input_precision, max_num_imprecise_acc)
        return _narrow(result, d_bf16)

    builder.create_dot = create_dot

    def reduction(original):
        @functools.wraps(original)
        def patched(self, input, *args, **kwargs):
            import triton.language as tl

            tensor = input[0] if isinstance(input, tuple) else input
            if tensor.dtype.scalar != tl.bfloat16:
                return original(self, input, *args, **kwargs)
            wide = self.to_tensor(bf16_bits_to_fp32(tensor.handle.data), tl.float32)
            out = original(self, wide, *args, **kwargs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            fixed = [
                self.to_tensor(fp32_to_bf16_bits(o.handle.data).reshape(o.handle.data.shape), tl.bfloat16)
                if o.dtype.scalar == tl.float32 else o
                for o in outs
            ]
            if isinstance(out, list):
                return fixed
            return tuple(fixed) if isinstance(out, tuple) else fixed[0]

        return patched

    interp.ReduceOps.sum = reduction(interp.ReduceOps.sum)
    interp.ReduceOps.min_max = reduction(interp.ReduceOps.min_max)
    interp.ScanOps.cumsum = reduction(interp.ScanOps.cumsum)
    interp.ScanOps.cumprod = reduction(interp.ScanOps.cumprod)
    _INSTALLED = True
    return True
