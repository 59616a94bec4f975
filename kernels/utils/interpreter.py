"""Two fixes for Triton's CPU interpreter (``TRITON_INTERPRET=1``).

- **bf16 arithmetic and conversions.** The interpreter stores bf16 values as their raw ``uint16`` bits
  and hands those bits to numpy: ``a + b``, ``tl.dot``, ``tl.sum``, comparisons, ``tl.exp`` and
  ``tl.clamp`` then compute on integers, not on the numbers they encode, and a conversion to bf16
  truncates (fp32) or writes an integer's value as bits. The fix wraps the interpreter's arithmetic
  so that every bf16 operand is widened to fp32, the op runs in fp32, and a bf16 result is rounded
  back (round-to-nearest-even, like the hardware); conversions to and from bf16 (``.to``, and the
  one a store into a bf16 pointer makes) go through the values and round the same way. Pure data
  movement (loads, stores of bf16 values, ``where``, reshapes) already works on the bits and is left
  alone.
- **Descriptor reductions.** ``desc.atomic_add`` (and ``atomic_min``/``max``/``and``/``or``/``xor``),
  a TMA bulk reduction on sm_90, has no interpreter implementation (``create_descriptor_reduce``
  is missing). The fix adds one: a masked read-modify-write of the block, elements outside the
  descriptor's shape left alone, as the hardware does. The interpreter runs programs one after
  another, so the read-modify-write is atomic there.

Only the interpreter is touched; compiled GPU kernels are unaffected.
"""

from __future__ import annotations

import functools

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


def interpreting() -> bool:
    """Whether ``@triton.jit`` functions run on Triton's CPU interpreter: ``TRITON_INTERPRET`` read as Triton
    reads it (its knob: "1", "true", "on", "yes" are on; "0", "false", "off", "no" and unset are off)."""
    try:
        from triton import knobs
    except ImportError:  # no Triton (or one without knobs): nothing is interpreted
        return False
    return bool(knobs.runtime.interpret)


def install_interpreter_fixes_when_interpreting() -> bool:
    """Install the fixes when ``TRITON_INTERPRET`` is on (``@triton.jit`` functions defined now will run
    on the interpreter). Returns whether they are installed."""
    if not interpreting():
        return _INSTALLED
    return install_interpreter_fixes()


def install_interpreter_fixes() -> bool:
    """Patch the Triton interpreter: bf16 arithmetic computes on values, not bits, descriptor
    reductions run, and one-element blocks index (loop bounds) under numpy >= 2.4 on Triton before 3.9.

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

    for name in ("create_fma", "create_rsqrt", "create_erf", "create_clampf"):
        setattr(builder, name, elementwise(getattr(builder, name)))

    original_cast = builder.cast_impl  # every int / float conversion (create_fp_trunc, create_si_to_fp, ...)

    def cast_impl(self, src, dst_type):
        import triton.language as tl
        from triton.runtime.interpreter import TensorHandle

        to_bf16 = dst_type.scalar == tl.bfloat16
        if not (_is_bf16(src) or to_bf16):
            return original_cast(self, src, dst_type)
        values = bf16_bits_to_fp32(src.data) if _is_bf16(src) else src.data  # the numbers, not the bits
        if to_bf16:  # rounded to nearest even, as the hardware's cvt.rn (the interpreter truncated)
            return TensorHandle(fp32_to_bf16_bits(values.astype(np.float32)).reshape(values.shape), tl.bfloat16)
        return original_cast(self, TensorHandle(values, tl.float32), dst_type)

    builder.cast_impl = cast_impl

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
    builder.create_descriptor_reduce = _descriptor_reduce
    patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if patch_tensor is not None:
        interp._patch_lang_tensor = _with_scalar_index(patch_tensor)
    _INSTALLED = True
    return True


def _with_scalar_index(patch_tensor):
    """``_patch_lang_tensor`` whose ``tensor.__index__`` reads a one-element block of any rank: Triton before 3.9
    takes ``int()`` of the raw array, which numpy 2.4 refuses for a 1-d array (a loop bound computed in a kernel,
    ``range(start, end, BLOCK)``, failed with 'only 0-dimensional arrays can be converted to Python scalars')."""

    def index(self):
        return int(self.handle.data.reshape(()))

    @functools.wraps(patch_tensor)
    def patched(tensor, scope=None):
        if scope is None:  # Triton 3.4 / 3.5: _patch_lang_tensor(tensor) sets the attributes itself
            patch_tensor(tensor)
            tensor.__index__ = index
            return
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", index)

    return patched


def _descriptor_reduce(self, kind, desc, value, indices):
    """``InterpreterBuilder.create_descriptor_reduce``: combine ``value`` into the block of ``desc`` at
    ``indices`` with the reduction ``kind``; elements outside the descriptor's shape are not touched."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import TensorHandle

    combine = {
        ir.DESCRIPTOR_REDUCE_KIND.ADD: np.add,
        ir.DESCRIPTOR_REDUCE_KIND.MIN: np.minimum,
        ir.DESCRIPTOR_REDUCE_KIND.MAX: np.maximum,
        ir.DESCRIPTOR_REDUCE_KIND.AND: np.bitwise_and,
        ir.DESCRIPTOR_REDUCE_KIND.OR: np.bitwise_or,
        ir.DESCRIPTOR_REDUCE_KIND.XOR: np.bitwise_xor,
    }.get(kind)
    if combine is None:
        raise NotImplementedError(f"descriptor reduction {kind} is not supported by the interpreter")
    ptrs, mask = desc.materialize_pointers(indices)
    old = _with_cache_arguments(self.create_masked_load, (ptrs, mask, None), (False,))
    if old.dtype == tl.bfloat16:  # combine the values the bits encode, round the result back
        new = fp32_to_bf16_bits(combine(bf16_bits_to_fp32(old.data), bf16_bits_to_fp32(value.data)))
    else:
        new = combine(old.data, value.data.astype(old.data.dtype))
    _with_cache_arguments(self.create_masked_store, (ptrs, TensorHandle(new.reshape(old.data.shape), old.dtype), mask))


def _with_cache_arguments(method, leading: tuple, trailing: tuple = ()):
    """``method(*leading, <cache arguments>, *trailing)`` for a masked load or store of the interpreter's builder,
    whose cache arguments (ignored there) are one from Triton 3.9 (``cache_policy``) and two before it
    (``cache_modifier, eviction_policy``). A wrong count fails when the arguments are bound, before anything is
    read or written, so the newer form is tried first (the signature itself can be a wrapper's, the work meter's)."""
    try:
        return method(*leading, None, *trailing)
    except TypeError as error:
        if "positional argument" not in str(error):
            raise
    return method(*leading, None, None, *trailing)
