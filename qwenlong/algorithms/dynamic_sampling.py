"""DAPO dynamic sampling: train only on groups whose rewards differ.

A group whose G rewards are all equal has zero advantage everywhere and so contributes no
policy gradient; it only dilutes the batch. DAPO drops such groups and keeps generating new
ones until the training batch is full, up to a limit on generation rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

Group = TypeVar("Group")


def informative_groups(rewards: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """``[num_groups]`` bool: True where a group's rewards are not all equal (max - min > atol).

    Args:
        rewards: ``[num_groups, group_size]`` rewards. A group of one is never informative.
        atol: rewards closer than this count as equal.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards: expected a [num_groups, group_size] tensor, got shape {tuple(rewards.shape)}")
    if rewards.shape[1] == 0:
        return torch.zeros(rewards.shape[0], dtype=torch.bool, device=rewards.device)
    return (rewards.amax(dim=1) - rewards.amin(dim=1)) > atol


@dataclass
class GroupCollector(Generic[Group]):
    """Collects informative groups over generation rounds until ``target_groups`` are kept.

    Usage::

        collector = GroupCollector(target_groups=128, max_rounds=10)
        while not collector.done:
            groups, rewards = generate_and_score(...)   # rewards: [len(groups), G]
            collector.add(groups, rewards)
        batch = collector.batch()                       # at most target_groups groups, in arrival order

    With ``enabled=False`` every group is kept (plain GRPO): one round fills the batch.
    When ``max_rounds`` runs out first, ``batch()`` returns the groups kept so far and ``full``
    is False; the trainer decides whether to train on the smaller batch.
    """

    target_groups: int
    max_rounds: int = 10
    enabled: bool = True
    atol: float = 0.0
    rounds: int = field(default=0, init=False)
    groups_seen: int = field(default=0, init=False)
    _kept: list = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.target_groups < 1:
            raise ValueError(f"target_groups: expected >= 1, got {self.target_groups}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds: expected >= 1, got {self.max_rounds}")

    @property
    def full(self) -> bool:
        return len(self._kept) >= self.target_groups

    @property
    def done(self) -> bool:
        return self.full or self.rounds >= self.max_rounds

    def add(self, groups: Sequence[Group], rewards: torch.Tensor) -> int:
        """Record one generation round; returns how many of its groups were kept."""
        if rewards.dim() != 2 or rewards.shape[0] != len(groups):
            raise ValueError(f"rewards: expected shape ({len(groups)}, group_size), got {tuple(rewards.shape)}")
        if self.done:
            raise ValueError("add: the collector is done (batch full or round limit reached)")
        keep = informative_groups(rewards, self.atol).tolist() if self.enabled else [True] * len(groups)
        kept = [group for group, k in zip(groups, keep, strict=True) if k]
        self._kept.extend(kept)
        self.rounds += 1
        self.groups_seen += len(groups)
        return len(kept)

    def batch(self) -> list[Group]:
        """The first ``target_groups`` kept groups (fewer if the round limit was hit)."""
        return self._kept[: self.target_groups]

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging per step."""
        return {
            "dynamic_sampling/rounds": float(self.rounds),
            "dynamic_sampling/groups_seen": float(self.groups_seen),
            "dynamic_sampling/groups_kept": float(len(self._kept)),
            "dynamic_sampling/keep_rate": len(self._kept) / max(self.groups_seen, 1),
        }
