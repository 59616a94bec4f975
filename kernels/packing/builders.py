"""Index tensors for a packed micro-batch: ``cu_seqlens`` and per-sequence position ids.

Both take the lengths of the sequences in the micro-batch, in packing order (a list, numpy
array or integer tensor). Vectorised torch, so they run on the device the tensors live on.
"""

from __future__ import annotations

import numpy as np
import torch

_INT32_MAX = 2**31 - 1


def _as_length_tensor(lengths, device) -> torch.Tensor:
    """``lengths`` as int64 on ``device``, each in [0, int32 max]: a packed batch indexes its tokens with
    int32, so a longer sequence could never be packed (and a sum of int64 lengths could wrap around)."""
    if isinstance(lengths, torch.Tensor) and lengths.dtype == torch.uint64:
        device = device if device is not None else lengths.device
        lengths = lengths.cpu().numpy()  # torch has no uint64 comparisons on CPU; numpy does
    if not isinstance(lengths, torch.Tensor):
        array = np.asarray(lengths)
        if array.dtype.kind not in "biufcO":  # text, dates...
            raise ValueError(f"lengths must hold integers, got dtype {array.dtype}")
        if array.dtype == object:  # Python ints beyond int64, or not ints at all
            for i, value in enumerate(array.reshape(-1)):
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or abs(value) > _INT32_MAX:
                    raise ValueError(f"lengths[{i}] must be an integer token count, got {value!r}")
        if array.dtype.kind == "u" and array.size and int(array.max()) > _INT32_MAX:  # .to(int64) could wrap
            first = int(np.argmax(array > _INT32_MAX))
            raise ValueError(f"lengths[{first}] is {int(array[first])} tokens, more than int32 can index")
        # a copy where numpy's strides have no torch form (a reversed view: negative strides)
        lengths = torch.as_tensor(np.ascontiguousarray(array.astype(np.int64) if array.dtype.kind in "uO" else array))
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.numel() and (lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool):
        raise ValueError(f"lengths must hold integers, got dtype {str(lengths.dtype).replace('torch.', '')}")
    lengths = lengths.to(device=device if device is not None else lengths.device, dtype=torch.int64)
    if lengths.numel() and bool((lengths < 0).any()):
        first = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"lengths[{first}] is negative ({int(lengths[first])})")
    if lengths.numel() and bool((lengths > _INT32_MAX).any()):
        first = int(torch.nonzero(lengths > _INT32_MAX)[0, 0])
        raise ValueError(f"lengths[{first}] is {int(lengths[first])} tokens, more than int32 can index")
    return lengths


def _check_total(lengths: torch.Tensor) -> int:
    """The token count of the batch (each length is at most int32 max, so the int64 sum cannot wrap)."""
    total = int(lengths.sum())
    if total > _INT32_MAX:
        raise ValueError(f"lengths add up to {total} tokens, more than int32 cu_seqlens can index")
    return total


def build_cu_seqlens(lengths, device: torch.device | str | None = None) -> torch.Tensor:
    """``int32 [n + 1]``: 0, then the running token count after each sequence.

    Raises ``ValueError`` naming ``lengths`` when a length is negative, does not fit int64, or the
    total does not fit int32.
    """
    lengths = _as_length_tensor(lengths, device)
    _check_total(lengths)
    cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    return cu_seqlens.to(torch.int32)


def build_position_ids(lengths, device: torch.device | str | None = None) -> torch.Tensor:
    """``int64 [total]``: 0, 1, ..., L_i - 1 for each sequence, concatenated.

    Raises ``ValueError`` as :func:`build_cu_seqlens` does (before allocating ``total`` positions)."""
    lengths = _as_length_tensor(lengths, device)
    total = _check_total(lengths)
    starts = torch.cumsum(lengths, dim=0) - lengths
    token = torch.arange(total, dtype=torch.int64, device=lengths.device)
    return token - torch.repeat_interleave(starts, lengths, output_size=total)
