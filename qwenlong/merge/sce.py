"""SCE merging of one tensor (Wan et al., 2024, FuseChat: Select, Calculate, Erase).

Given a base tensor ``b`` and M fine-tuned versions ``x_1..x_M`` of it, with deltas
``d_i = x_i - b``:

1. Select: keep, in every delta, only the entries where the deltas disagree most: the
   ``select_topk`` fraction of positions with the largest variance across the M models
   (population variance, per position; among equal variances the first positions, so the choice
   is the same on every device); the other entries of every delta become 0.
2. Calculate: one weight per model from its (selected) delta's magnitude,
   ``w_i = mean(d_i^2) / sum_j mean(d_j^2)`` (uniform when every delta is 0).
3. Erase: per position, the majority sign is the sign of ``sum_i d_i`` (sign by summed mass);
   an entry whose sign differs from it is dropped.

The merged tensor is the base plus the weighted mean of the surviving entries:

    merged = b + sum_i w_i m_i d_i / sum_i w_i m_i        (m_i: survives the erase; 0/0 -> 0)

Computed in float32 (float64 for float64 tensors) and returned in the base's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sce_select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """``[...]`` bool: the ``select_topk`` fraction of positions (``int(fraction * numel)``) whose deltas
    vary most across models (``deltas``: ``[M, ...]``), ties to the first positions. All positions for a
    fraction of 1."""
    if not 0.0 < select_topk <= 1.0:
        raise ValueError(f"select_topk: expected a fraction in (0, 1], got {select_topk}")
    if select_topk == 1.0:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    variance = deltas.var(dim=0, unbiased=False).flatten()
    k = int(select_topk * variance.numel())
    mask = torch.zeros(variance.numel(), dtype=torch.bool, device=deltas.device)
    if k > 0:  # all above the k-th largest variance, then positions equal to it in order up to k
        threshold = torch.kthvalue(variance, variance.numel() - k + 1).values
        mask = variance > threshold
        ties = (variance == threshold).nonzero().flatten()
        mask[ties[: k - int(mask.sum())]] = True
    return mask.view(deltas.shape[1:])


def sce_weights(deltas: torch.Tensor) -> torch.Tensor:
    """``[M]`` per-model weights of this tensor: each delta's mean square, normalised to sum 1."""
    energy = deltas.square().reshape(len(deltas), -1).mean(dim=1)  # reshape: a 0-dim tensor's deltas are [M]
    total = energy.sum()
    if total <= 0:
        return torch.full_like(energy, 1.0 / len(energy))
    return energy / total


def sce_merge_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE-merge ``tensors`` (fine-tuned versions of ``base``, same shape) into ``base`` (module docstring)."""
    if not tensors:
        raise ValueError("tensors: need at least one model to merge into the base")
    for i, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise ValueError(f"tensors[{i}]: shape {tuple(tensor.shape)} differs from the base's {tuple(base.shape)}")
    compute = torch.float64 if base.dtype == torch.float64 else torch.float32
    base_c = base.to(compute)
    deltas = torch.stack([t.to(compute) - base_c for t in tensors])
    deltas = deltas * sce_select_mask(deltas, select_topk)
    weights = sce_weights(deltas).view(-1, *([1] * base.dim()))
    majority = deltas.sum(dim=0).sign()
    kept = (deltas.sign() == majority).to(compute) * weights
    divisor = kept.sum(dim=0)
    merged_delta = (deltas * kept).sum(dim=0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return (base_c + merged_delta).to(base.dtype)
