"""Count the work a Triton kernel issues by running it under the CPU interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.dot``, ``tl.load`` and ``tl.store`` of a kernel goes
through one builder object; :func:`counting` wraps those builder methods for the duration of a
``with`` block and adds up what they see:

- ``flops``: ``2 * M * N * K`` per ``tl.dot`` (times any batch dimensions), from the operand shapes;
- ``bytes_loaded`` / ``bytes_stored``: elements whose mask is set times the element size, for
  ``tl.load`` / ``tl.store`` (block pointers and tensor descriptors included); atomics count one
  load and one store per active element;
- ``programs``: programs run (grid size summed over launches); ``launches``: kernel launches.

``by_kernel`` splits the same numbers per ``@triton.jit`` function name. Work done by PyTorch
ops between launches (allocations, casts, reductions) is not counted: the meter measures the
kernels. A masked-off element costs nothing here, as on the GPU (real hardware moves whole
sectors, so this is a lower bound on traffic for scattered accesses).

API::

    from benchmarks.work.counting import count_work, counting

    work = count_work(fn, *args, **kwargs)   # WorkCount of everything fn launched
    with counting() as work:                 # or around any block
        ...
    work.flops, work.bytes_loaded, work.bytes_stored, work.programs, work.launches, work.by_kernel

The interpreter must be on before the kernels are *defined* (``@triton.jit`` picks the
interpreter at decoration time): set ``TRITON_INTERPRET=1`` before importing ``qwenlong.kernels``,
or use :func:`require_interpreter` / run the meter as ``python -m benchmarks --only work``,
which starts a fresh interpreter process when needed. Counting is not thread-safe.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["WorkCount", "count_work", "counting", "interpreter_active", "require_interpreter"]


@dataclass
class WorkCount:
    """Work issued by Triton kernels: see the module docstring for what each field counts."""

    flops: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    programs: int = 0
    launches: int = 0
    by_kernel: dict[str, WorkCount] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in ("flops", "bytes_loaded", "bytes_stored", "programs", "launches")}
        if self.by_kernel:
            out["by_kernel"] = {name: work.as_dict() for name, work in self.by_kernel.items()}
        return out

    def _add(self, kernel: str | None, **amounts: int) -> None:
        targets = [self] if kernel is None else [self, self.by_kernel.setdefault(kernel, WorkCount())]
        for target in targets:
            for name, amount in amounts.items():
                setattr(target, name, getattr(target, name) + int(amount))


def interpreter_active() -> bool:
    """True when ``@triton.jit`` functions defined now run on the interpreter."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def require_interpreter() -> None:
    """Raise RuntimeError unless Triton kernels run on the interpreter (nothing can be counted otherwise)."""
    if not interpreter_active() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("counting Triton work needs TRITON_INTERPRET=1 set before the kernels are imported")


def _element_bytes(ptrs) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _active(mask, ptrs) -> int:
    if mask is None:
        return int(np.asarray(ptrs.data).size)
    return int(np.count_nonzero(np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape)))


@contextlib.contextmanager
def counting():
    """Context manager yielding a :class:`WorkCount` that fills while kernels run inside the block."""
    require_interpreter()
    from triton.runtime import interpreter as interp

    # the bf16 fix wraps the same builder methods; install it first so restoring ours cannot drop it
    from qwenlong.kernels.utils.interpreter import install_bf16_fix

    install_bf16_fix()
    builder, executor = interp.InterpreterBuilder, interp.GridExecutor
    work = WorkCount()
    current: list[str | None] = [None]
    saved = {name: getattr(builder, name) for name in (
        "create_dot", "create_masked_load", "create_masked_store", "set_grid_idx", "create_atomic_rmw",
        "create_atomic_cas")}
    saved_call = executor.__call__

    def create_dot(self, a, b, d, *args, **kwargs):
        a_shape, b_shape = np.asarray(a.data).shape, np.asarray(b.data).shape
        batch = int(np.prod(a_shape[:-2])) if len(a_shape) > 2 else 1
        work._add(current[0], flops=2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1])
        return saved["create_dot"](self, a, b, d, *args, **kwargs)

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        work._add(current[0], bytes_loaded=_active(mask, ptrs) * _element_bytes(ptrs))
        return saved["create_masked_load"](self, ptrs, mask, other, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        work._add(current[0], bytes_stored=_active(mask, ptrs) * _element_bytes(ptrs))
        return saved["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def create_atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
        moved = _active(mask, ptr) * _element_bytes(ptr)
        work._add(current[0], bytes_loaded=moved, bytes_stored=moved)
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *args, **kwargs)

    def create_atomic_cas(self, ptr, cmp, val, *args, **kwargs):
        moved = _active(None, ptr) * _element_bytes(ptr)
        work._add(current[0], bytes_loaded=moved, bytes_stored=moved)
        return saved["create_atomic_cas"](self, ptr, cmp, val, *args, **kwargs)

    def set_grid_idx(self, *idx):
        work._add(current[0], programs=1)
        return saved["set_grid_idx"](self, *idx)

    def call(self, *args, **kwargs):
        outer = current[0]
        current[0] = getattr(self.fn, "__name__", "kernel")
        work._add(current[0], launches=1)
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            current[0] = outer

    patched = {"create_dot": create_dot, "create_masked_load": create_masked_load,
               "create_masked_store": create_masked_store, "set_grid_idx": set_grid_idx,
               "create_atomic_rmw": create_atomic_rmw, "create_atomic_cas": create_atomic_cas}
    try:
        for name, fn in patched.items():
            setattr(builder, name, fn)
        executor.__call__ = call
        yield work
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        executor.__call__ = saved_call


def count_work(fn, *args, **kwargs) -> WorkCount:
    """Run ``fn(*args, **kwargs)`` and return the work of every Triton kernel it launched."""
    with counting() as work:
        fn(*args, **kwargs)
    return work
