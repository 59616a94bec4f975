"""Index tensors for a packed micro-batch: ``cu_seqlens`` and per-sequence position ids.

Both take the lengths of the sequences in the micro-batch, in packing order (a list, numpy
array or integer tensor). Vectorised torch, so they run on the device the tensors live on.
"""

from __future__ import annotations

import torch

_INT32_MAX = 2**31 - 1


def _as_length_tensor(lengths, device) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.numel() and (lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool):
        raise ValueError(f"lengths must hold integers, got dtype {str(lengths.dtype).replace('torch.', '')}")
    lengths = lengths.to(device=device if device is not None else lengths.device, dtype=torch.int64)
    if lengths.numel() and bool((lengths < 0).any()):
        first = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"lengths[{first}] is negative ({int(lengths[first])})")
    return lengths


def build_cu_seqlens(lengths, device: torch.device | str | None = None) -> torch.Tensor:
    """``int32 [n + 1]``: 0, then the running token count after each sequence.

    Raises ``ValueError`` when a length is negative or the total does not fit int32.
    """
    lengths = _as_length_tensor(lengths, device)
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    if int(cu_seqlens[-1]) > _INT32_MAX:
        raise ValueError(f"lengths add up to {int(cu_seqlens[-1])} tokens, more than int32 cu_seqlens can index")
    return cu_seqlens.to(torch.int32)


def build_position_ids(lengths, device: torch.device | str | None = None) -> torch.Tensor:
    """``int64 [total]``: 0, 1, ..., L_i - 1 for each sequence, concatenated."""
    lengths = _as_length_tensor(lengths, device)
    starts = torch.cumsum(lengths, dim=0) - lengths
    total = int(lengths.sum())
    token = torch.arange(total, dtype=torch.int64, device=lengths.device)
    return token - torch.repeat_interleave(starts, lengths, output_size=total)
