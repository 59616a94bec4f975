"""Global scratch for tensor descriptors that kernels make on the device (``tl.make_tensor_descriptor``).

Such a kernel asks Triton's allocator for scratch at launch (128 bytes per descriptor and program on sm_90).
The allocator is a per-context setting whose default raises at launch, and autograd runs backward in threads of
its own, which start without the caller's setting: so every launcher of such a kernel calls
:func:`ensure_scratch_allocator` first, which sets PyTorch's caching allocator where none is set and leaves a
caller's own alone. The interpreter needs none.
"""

from __future__ import annotations

import torch
import triton


def scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Scratch from PyTorch's caching allocator, on the current device (the launch's)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator(device: torch.device) -> None:
    """Set :func:`scratch` as Triton's allocator in this thread's context unless one is set (GPU launches only)."""
    if device.type != "cuda":
        return
    from triton.runtime import _allocation  # the default is a NullAllocator that raises at launch

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(scratch)
