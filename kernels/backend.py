"""Which implementation an op runs: Triton, the CUDA extension, or PyTorch.

The choice follows the tensors: CUDA tensors run Triton kernels (or the CUDA extension
where an op has one and it is asked for); CPU tensors run the PyTorch implementation, or
Triton kernels under the interpreter when ``TRITON_INTERPRET=1`` (that is how the Triton
kernels are tested without a GPU). ``QWENLONG_BACKEND`` forces a path for every op
(``triton``, ``cuda``, ``torch``); unset or ``auto`` chooses as above.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from .utils.interpreter import interpreting

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "QWENLONG_BACKEND"


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``, read as Triton reads it)."""
    return interpreting()


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def requested_backend(override: str | None = None) -> str:
    """The backend asked for by ``override`` or, when None, by ``QWENLONG_BACKEND``."""
    choice = (override or os.environ.get(ENV_VAR, "auto")).strip().lower()
    if choice not in BACKENDS:
        source = "backend" if override else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    return choice


def tile_table(device: torch.device) -> int:
    """Which tile table the Triton kernels use on ``device``: 90 on sm_90 (Hopper: wgmma and TMA), else 80
    (every other GPU, and the CPU interpreter)."""
    # ROCm builds report their own gfx versions as capabilities (MI300 is "9.4"): not sm_90
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9:
        return 90
    return 80


def select_backend(device: torch.device, override: str | None = None, has_cuda_op: bool = False) -> str:
    """Resolve the path an op takes for tensors on ``device``: 'triton', 'cuda' or 'torch'."""
    choice = requested_backend(override)
    on_gpu = device.type == "cuda"
    if choice == "auto":
        if on_gpu and triton_available():
            return "triton"
        if not on_gpu and interpreter_enabled() and triton_available():
            return "triton"
        return "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("backend 'triton' requested but triton is not installed")
    if choice == "triton" and not on_gpu and not interpreter_enabled():
        raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    if choice == "cuda":
        if not has_cuda_op:
            raise RuntimeError("backend 'cuda' requested but this op has no CUDA-extension path")
        if not on_gpu:
            raise RuntimeError("backend 'cuda' needs CUDA tensors")
        from qwenlong import _C

        if _C.cuda is None:
            raise RuntimeError(f"backend 'cuda' requested but the CUDA extension qwenlong._C._cuda is not built "
                               f"(importing it failed with {_C.cuda_error})")
    return choice
