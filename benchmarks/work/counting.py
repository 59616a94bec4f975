"""Count the work a Triton kernel issues by running it under the CPU interpreter.

Under ``TRITON_INTERPRET=1`` every ``tl.dot``, ``tl.load`` and ``tl.store`` of a kernel goes
through one builder object; :func:`counting` wraps those builder methods for the duration of a
``with`` block and adds up what they see:

- ``flops``: ``2 * M * N * K`` per ``tl.dot`` (times any batch dimensions), from the operand shapes;
- ``bytes_loaded`` / ``bytes_stored``: elements whose mask is set times the element size, for
  ``tl.load`` / ``tl.store`` (block pointers and tensor descriptors included); atomics count one
  load and one store per active element;
- ``programs``: programs run (grid size summed over launches); ``launches``: kernel launches.

PyTorch ops run between launches (buffer zeroing, casts, the GEMMs of a PyTorch path) are counted
too, through a ``TorchDispatchMode``: FLOPs from PyTorch's own formulas
(``torch.utils.flop_counter``: matmuls, convolutions, attention), bytes as each op reading its
tensor inputs once and writing its outputs once (views and ``empty`` cost nothing; gathers and
scatters count only the rows they move). Pass ``torch_ops=False`` to count the kernels alone.

The same mode follows the memory the block holds: ``peak_held`` is the most bytes of tensor storage made
inside the block (by PyTorch ops outside kernel launches) that were alive at one time, outputs included;
storage that existed before the block (inputs, and views of them) does not count. A storage is seen as
freed at the first op after its last tensor is gone, as PyTorch's allocator would reuse it.

``by_kernel`` splits the numbers per ``@triton.jit`` function name and per PyTorch op
(``aten.mm``, ...). A masked-off element costs nothing, as on the GPU (real hardware moves whole
sectors, so this is a lower bound on traffic for scattered accesses).

API::

    from benchmarks.work.counting import count_work, counting

    work = count_work(fn, *args, **kwargs)   # WorkCount of everything fn launched and every torch op it ran
    with counting(torch_ops=False) as work:  # or around any block, kernels only
        ...
    work.flops, work.bytes_loaded, work.bytes_stored, work.programs, work.launches, work.by_kernel, work.peak_held

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
    peak_held: int = 0  # bytes: PyTorch ops only, the whole block (not split per kernel)
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


# ops whose first argument is only written (never read) and ops that move only part of their inputs
_WRITE_ONLY = {"fill_", "zero_", "copy_", "zeros", "zeros_like", "full", "full_like", "ones", "ones_like", "new_zeros",
               "new_full", "new_ones", "scalar_tensor", "arange"}
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
               "_to_copy_meta", "set_"}
_PARTIAL = {"index_select", "gather", "index", "index_copy_", "index_copy", "index_add_", "scatter_", "scatter_add_",
            "scatter", "index_put_", "masked_select", "nonzero"}


def _tensors(tree) -> list:
    import torch
    from torch.utils._pytree import tree_leaves

    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _torch_counter(work: WorkCount, paused: list[bool]):
    """A TorchDispatchMode adding every aten op's FLOPs and bytes to ``work`` (see the module docstring)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    held: dict[int, tuple] = {}  # storage address -> (weak reference, bytes): storage made inside the block
    held_bytes = [0]

    def release_freed():
        for address, (ref, nbytes) in list(held.items()):
            if ref.expired():
                del held[address]
                held_bytes[0] -= nbytes

    def hold_new(args, kwargs, out):
        existing = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if storage.nbytes() and address not in existing and address not in held:
                held[address] = (StorageWeakRef(storage), storage.nbytes())
                held_bytes[0] += storage.nbytes()
        work.peak_held = max(work.peak_held, held_bytes[0])

    class TorchOpCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if not paused[0]:
                release_freed()  # before the op allocates: what died since the last op is free again
            out = func(*args, **kwargs)
            if not paused[0]:
                hold_new(args, kwargs, out)
            if paused[0] or func.is_view:
                return out
            name = func.overloadpacket.__name__
            if name in _NO_TRAFFIC:
                return out
            packet = func.overloadpacket
            flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
            inputs, outputs = _tensors((args, kwargs)), _tensors(out)
            if name in _PARTIAL:  # moves as many elements as the op's result / source, plus the index
                moved = _nbytes(outputs) if not name.endswith("_") else _nbytes(inputs[2:])
                loaded = moved + _nbytes(t for t in inputs if not t.is_floating_point() and t.dim() == 1)
                stored = moved
            else:
                loaded = _nbytes(inputs[1:] if name in _WRITE_ONLY else inputs)
                stored = _nbytes(outputs)
            work._add(f"aten.{name}", flops=flops, bytes_loaded=loaded, bytes_stored=stored)
            return out

    return TorchOpCounter()


@contextlib.contextmanager
def counting(torch_ops: bool = True):
    """Context manager yielding a :class:`WorkCount` that fills while kernels (and, with ``torch_ops``,
    PyTorch ops) run inside the block."""
    require_interpreter()
    from triton.runtime import interpreter as interp

    # the interpreter fixes wrap the same builder methods; install them first so restoring ours cannot drop them
    from qwenlong.kernels.utils.interpreter import install_interpreter_fixes

    install_interpreter_fixes()
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

    paused = [False]  # the interpreter's own tensor copies around a launch are not the kernel's work

    def call(self, *args, **kwargs):
        outer, outer_paused = current[0], paused[0]
        current[0], paused[0] = getattr(self.fn, "__name__", "kernel"), True
        work._add(current[0], launches=1)
        try:
            return saved_call(self, *args, **kwargs)
        finally:
            current[0], paused[0] = outer, outer_paused

    patched = {"create_dot": create_dot, "create_masked_load": create_masked_load,
               "create_masked_store": create_masked_store, "set_grid_idx": set_grid_idx,
               "create_atomic_rmw": create_atomic_rmw, "create_atomic_cas": create_atomic_cas}
    try:
        for name, fn in patched.items():
            setattr(builder, name, fn)
        executor.__call__ = call
        with _torch_counter(work, paused) if torch_ops else contextlib.nullcontext():
            yield work
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        executor.__call__ = saved_call


def count_work(fn, *args, torch_ops: bool = True, **kwargs) -> WorkCount:
    """Run ``fn(*args, **kwargs)`` and return the work of every Triton kernel it launched (and every
    PyTorch op it ran, unless ``torch_ops=False``)."""
    with counting(torch_ops) as work:
        fn(*args, **kwargs)
    return work
