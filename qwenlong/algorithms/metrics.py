"""Accuracy metrics over groups of sampled responses.

A response is *accurate* when its task reward is 1.0 (method.md section 3); use the reward
before any overlong penalty.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def is_accurate(rewards: torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """Bool tensor: reward equals 1.0 (within ``atol``)."""
    return (rewards - 1.0).abs() <= atol


def pass_at_k(num_correct: torch.Tensor, num_samples: int, k: int) -> torch.Tensor:
    """Unbiased pass@k per problem from c correct out of n samples (Chen et al., 2021):

        pass@k = 1 - C(n - c, k) / C(n, k)

    Returns a float64 tensor shaped like ``num_correct``.
    """
    if not 1 <= k <= num_samples:
        raise ValueError(f"k: expected 1 <= k <= num_samples={num_samples}, got {k}")
    counts = [int(c) for c in num_correct.flatten().tolist()]
    if any(not 0 <= c <= num_samples for c in counts):
        raise ValueError(f"num_correct: expected values in [0, {num_samples}], got {counts}")
    total = math.comb(num_samples, k)
    # in exact fractions, rounded once: c/n for k = 1, and the value that lies nearest the true one
    values = [float(1 - Fraction(math.comb(num_samples - c, k), total)) for c in counts]
    return torch.tensor(values, dtype=torch.float64).reshape(num_correct.shape)


def group_accuracy_metrics(rewards: torch.Tensor, ks: tuple[int, ...] = (1,), atol: float = 1e-6) -> dict[str, float]:
    """Per-step accuracy summary of ``[num_groups, group_size]`` rewards.

    Returns ``accuracy`` (fraction of accurate responses), ``pass@k`` for each k (mean over
    groups), ``solve_all`` / ``solve_none`` (fraction of groups where every / no response is
    accurate) and ``reward_mean``.
    """
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards: expected a non-empty [num_groups, group_size] tensor, got {tuple(rewards.shape)}")
    accurate = is_accurate(rewards, atol)
    correct = accurate.sum(dim=1)
    group_size = rewards.shape[1]
    metrics = {
        "accuracy": accurate.double().mean().item(),
        "solve_all": (correct == group_size).double().mean().item(),
        "solve_none": (correct == 0).double().mean().item(),
        "reward_mean": rewards.double().mean().item(),
    }
    for k in ks:
        metrics[f"pass@{k}"] = pass_at_k(correct, group_size, k).mean().item()
    return metrics
