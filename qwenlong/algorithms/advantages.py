"""Group-relative advantages (GRPO), their broadcast to the tokens of a packed batch, and the reverse.

Rewards come as a ``[num_groups, group_size]`` tensor: row g holds the rewards of the G
responses sampled for prompt g. Every response token receives its response's advantage.
"""

from __future__ import annotations

import torch


def _check_rewards(rewards: torch.Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected a [num_groups, group_size] tensor, got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a floating-point tensor, got {rewards.dtype}")


def _group_std(centered: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Unbiased standard deviation of already-centred values; 0 for a single value (not NaN)."""
    n = centered.shape[dim]
    return (centered.square().sum(dim, keepdim=True) / max(n - 1, 1)).sqrt()


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantage of each response relative to its group.

        A_gi = (r_gi - mean_i r_gi) / (std_i r_gi + eps)     if normalize_std (GRPO, DAPO)
        A_gi =  r_gi - mean_i r_gi                           otherwise (Dr. GRPO's mean-only)

    ``std`` is the unbiased standard deviation within the group. A group whose rewards are all
    equal (including a group of one) gets advantage 0 everywhere.

    Args:
        rewards: ``[num_groups, group_size]`` float rewards.
        normalize_std: divide by the group's standard deviation.
        eps: added to the standard deviation so equal-reward groups do not divide by zero.
    Returns:
        ``[num_groups, group_size]`` advantages, same dtype as ``rewards``.
    """
    _check_rewards(rewards)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centered
    return centered / (_group_std(centered) + eps)


def task_normalized_advantages(rewards: torch.Tensor, task_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """QwenLong-L1.5 advantage: centred within the group, scaled by a per-task batch std.

        A_gi = (r_gi - mean_i r_gi) / (std{ r_hj : task(h) = task(g) } + eps)

    The standard deviation is taken over the rewards of *all* responses in the batch whose
    prompt has the same task type, so one task with naturally noisier rewards does not dominate
    the update, and a group whose rewards barely differ is not blown up by a tiny group std.

    Args:
        rewards: ``[num_groups, group_size]`` float rewards.
        task_ids: ``[num_groups]`` integer task id of each prompt.
        eps: added to each task's standard deviation.
    Returns:
        ``[num_groups, group_size]`` advantages.
    """
    _check_rewards(rewards)
    if task_ids.shape != rewards.shape[:1] or task_ids.is_floating_point():
        raise ValueError(
            f"task_ids: expected an integer tensor of shape ({rewards.shape[0]},), "
            f"got {task_ids.dtype} of shape {tuple(task_ids.shape)}"
        )
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    tasks, task_of_group = torch.unique(task_ids, return_inverse=True)
    task_std = torch.empty(len(tasks), dtype=rewards.dtype, device=rewards.device)
    for t in range(len(tasks)):
        task_rewards = rewards[task_of_group == t].flatten()
        task_std[t] = _group_std(task_rewards - task_rewards.mean(), dim=0).squeeze()
    return centered / (task_std[task_of_group].unsqueeze(1) + eps)


def broadcast_to_tokens(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Give every token of a packed batch the value of its sequence.

    Args:
        values: ``[batch]`` one value per sequence (e.g. ``group_advantages(...).flatten()``).
        cu_seqlens: ``[batch + 1]`` non-decreasing offsets starting at 0; empty sequences allowed.
    Returns:
        ``[cu_seqlens[-1]]`` tensor with ``out[t] = values[b]`` for ``cu_seqlens[b] <= t < cu_seqlens[b+1]``.
    """
    if values.dim() != 1:
        raise ValueError(f"values: expected a 1-D tensor (one value per sequence), got shape {tuple(values.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() != values.numel() + 1:
        raise ValueError(f"cu_seqlens: expected shape ({values.numel() + 1},), got {tuple(cu_seqlens.shape)}")
    lengths = cu_seqlens.diff().to(torch.long)
    if cu_seqlens[0] != 0 or bool((lengths < 0).any()):
        raise ValueError("cu_seqlens: must start at 0 and be non-decreasing")
    return torch.repeat_interleave(values, lengths.to(values.device))


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` within each packed sequence: ``[total_tokens] -> [B]`` (differentiable)."""
    lengths = cu_seqlens.diff().to(device=values.device, dtype=torch.long)
    if values.dim() != 1 or values.numel() != int(cu_seqlens[-1]):
        raise ValueError(
            f"values: expected a 1-D tensor of {int(cu_seqlens[-1])} tokens (cu_seqlens[-1]), got {tuple(values.shape)}"
        )
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens: must be non-decreasing")
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    return torch.zeros(len(lengths), dtype=values.dtype, device=values.device).index_add(0, seq_of_token, values)
