"""Argument checks shared by every op. Each raises ``ValueError`` naming the argument."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, value, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None):
    """``value`` must be a tensor with ``ndim`` dims and one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None skipped) must live on one device; returns it."""
    device = None
    first = None
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if device is None:
            device, first = tensor.device, name
        elif tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {first} is on {device}: move them to one device")
    return device


def check_dim(name: str, value: torch.Tensor, dim: int, expected: int, what: str):
    if value.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must equal {what} ({expected}), got shape {tuple(value.shape)}")


def check_cu_seqlens(name: str, cu_seqlens, total: int, device: torch.device | None = None) -> torch.Tensor:
    """``cu_seqlens``: int32, 1-D, starts at 0, non-decreasing, ends at ``total``."""
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must have at least one element (batch + 1), got 0")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but the data is on {device}")
    host = cu_seqlens.detach().cpu()
    if int(host[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(host[0])}")
    if host.numel() > 1 and bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing, got {host.tolist()[:16]}...")
    if int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}), got {int(host[-1])}")
    return cu_seqlens


CHECK_ENV_VAR = "QWENLONG_CHECK_TENSORS"


def tensor_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether checks that read ``tensor``'s data (and so wait for its device) should run.

    Always on CPU tensors (nothing to wait for); on a GPU only with ``QWENLONG_CHECK_TENSORS=1``,
    because reading a value back stalls the host until every queued kernel has finished.
    """
    if tensor.device.type == "cpu":
        return True
    return os.environ.get(CHECK_ENV_VAR, "0") not in ("", "0")
