"""Rotary position embedding (RoPE) for packed sequences, Qwen2 style (rotate-half layout).

For a head of size ``d``, pair ``i < d/2`` couples ``x[i]`` with ``x[i + d/2]``. A token at
position ``p`` (restarting at 0 per sequence) rotates the pair by ``a = p * theta^(-2i/d)``::

    x[i]       <- x[i] cos a - x[i + d/2] sin a
    x[i + d/2] <- x[i + d/2] cos a + x[i] sin a

The backward pass is the rotation by ``-a`` (a rotation's transpose is its inverse), so
nothing but the positions is saved. Inputs may be fp16 / bf16 / fp32; the math is fp32
(the angle formed as Hugging Face's Qwen2 forms it) and each output is rounded once.

Paths: the CUDA extension (``qwenlong._C.cuda.rotary_packed_``) on CUDA tensors when it is
built, else PyTorch, chunked over tokens so the fp32 temporaries stay small. There is no
Triton kernel: ``backend='triton'`` takes the same route as ``'auto'``.
"""

from __future__ import annotations

import torch

from qwenlong import _C

from .backend import requested_backend, select_backend
from .utils.checks import FLOAT_DTYPES, check_dim, check_same_device, check_tensor

MAX_HEAD_DIM = 256
CHUNK_TOKENS = 4096


def rotary_inv_freq(head_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for ``i < head_dim / 2``, fp32, computed as Hugging Face's Qwen2 does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    return 1.0 / (theta**exponents)


def _rotate_torch_(x, position_ids, inv_freq, inverse: bool) -> None:
    """In-place rotation of x, ``CHUNK_TOKENS`` tokens at a time (fp32 temporaries)."""
    half = inv_freq.numel()
    for start in range(0, x.shape[0], CHUNK_TOKENS):
        angle = position_ids[start : start + CHUNK_TOKENS].float()[:, None] * inv_freq
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        if inverse:
            sin = -sin
        first, second = x[start : start + CHUNK_TOKENS, :, :half], x[start : start + CHUNK_TOKENS, :, half:]
        x1, x2 = first.float(), second.float()  # fp32 inputs alias: compute both before writing
        rotated_first, rotated_second = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        first.copy_(rotated_first)
        second.copy_(rotated_second)


def _rotate_cuda_(x, position_ids, inv_freq, inverse: bool) -> None:
    _C.cuda.rotary_packed_(x, position_ids, inv_freq, inverse)


class _RotaryPacked(torch.autograd.Function):
    """Rotates one tensor (q or k): autograd allows an in-place Function on a view (q and k
    are often views of one fused projection) only when it returns a single tensor."""

    @staticmethod
    def forward(ctx, x, position_ids, inv_freq, inplace, rotate_):
        if inplace:
            ctx.mark_dirty(x)
        else:
            x = x.clone()
        rotate_(x, position_ids, inv_freq, False)
        ctx.save_for_backward(position_ids, inv_freq)
        ctx.rotate_ = rotate_
        return x

    @staticmethod
    def backward(ctx, grad):
        position_ids, inv_freq = ctx.saved_tensors
        grad = grad.clone(memory_format=torch.contiguous_format)
        ctx.rotate_(grad, position_ids, inv_freq, True)
        return grad, None, None, None, None


def _uses_cuda_extension(device: torch.device, backend: str | None) -> bool:
    choice = requested_backend(backend)
    if choice == "cuda":
        select_backend(device, "cuda", has_cuda_op=True)  # raises with the reason when impossible
        return True
    if choice == "torch":
        return False
    return device.type == "cuda" and _C.cuda is not None and hasattr(_C.cuda, "rotary_packed_")


def apply_rotary_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    theta: float = 1_000_000.0,
    inplace: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate packed ``q`` (total, q_heads, head_dim) and ``k`` (total, k_heads, head_dim).

    ``position_ids`` (total,) int32/int64 gives each token's position within its sequence
    (see ``build_position_ids``). ``theta`` is the model's ``rope_theta``: 1e6 for Qwen2.5
    and QwenLong-L1 checkpoints (``Qwen2Config``'s own default is 1e4; pass
    ``config.rope_parameters["rope_theta"]``). ``head_dim`` must be even and at most 256;
    q and k may have different head counts (GQA) and any token/head strides, but must be
    contiguous in ``head_dim``. With ``inplace`` q and k are overwritten and returned.
    Differentiable in q and k. ``backend``: None/'auto', 'cuda', 'torch' (see ``kernels.backend``).
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,))
    check_tensor("position_ids", position_ids, ndim=1, dtypes=(torch.int32, torch.int64))
    device = check_same_device(q=q, k=k, position_ids=position_ids)
    total, _, head_dim = q.shape
    check_dim("k", k, 0, total, "q.shape[0], the number of packed tokens")
    check_dim("k", k, 2, head_dim, "q.shape[2], head_dim")
    check_dim("position_ids", position_ids, 0, total, "q.shape[0], the number of packed tokens")
    if head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q.shape[2] (head_dim) must be even and at most {MAX_HEAD_DIM}, got {head_dim}")
    for name, x in (("q", q), ("k", k)):
        if x.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride 1), got strides {x.stride()}")
    if not (theta > 0):
        raise ValueError(f"theta must be positive, got {theta}")
    # one tensor (or two views of it from the same element) as q and k would be rotated twice in place; views of
    # a fused qkv projection start at different elements and are fine
    if inplace and q.numel() and q.data_ptr() == k.data_ptr():
        raise ValueError("q and k are the same memory: inplace=True would rotate it twice; pass inplace=False or "
                         "separate tensors")

    inv_freq = rotary_inv_freq(head_dim, theta, device)
    rotate_ = _rotate_cuda_ if _uses_cuda_extension(device, backend) else _rotate_torch_
    position_ids = position_ids.contiguous()
    return tuple(_RotaryPacked.apply(x, position_ids, inv_freq, bool(inplace), rotate_) for x in (q, k))
