"""Where rollout engines live: one engine per tensor-parallel slice of ranks, on those ranks' GPUs.

Ranks ``[e * tp, (e + 1) * tp)`` form engine ``e`` (consecutive ranks: one node's GPUs for any TP
that divides the GPUs per node, and the layout vLLM's own tensor-parallel groups take), so every GPU
generates and none hosts two engines. A step's prompts are spread round-robin over the engines,
never over sequence-parallel ranks: an SP group of 8 on TP-4 engines is two engines' worth of
generation, not one rank generating while seven wait.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RolloutPlacement:
    world_size: int
    tensor_parallel_size: int

    @property
    def num_engines(self) -> int:
        return self.world_size // self.tensor_parallel_size

    def engine_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < {self.world_size}, got {rank}")
        return rank // self.tensor_parallel_size

    def engine_ranks(self, engine: int) -> range:
        if not 0 <= engine < self.num_engines:
            raise ValueError(f"engine: expected 0 <= engine < {self.num_engines}, got {engine}")
        start = engine * self.tensor_parallel_size
        return range(start, start + self.tensor_parallel_size)

    def is_leader(self, rank: int) -> bool:
        """The rank that reports its engine's results (every rank of a slice gets the same outputs)."""
        return rank % self.tensor_parallel_size == 0

    def share(self, items: Sequence[T], engine: int) -> list[T]:
        """Engine ``engine``'s share of a step's prompts: every ``num_engines``-th, starting at ``engine``."""
        self.engine_ranks(engine)  # validates
        return list(items[engine::self.num_engines])


def rollout_placement(world_size: int, tensor_parallel_size: int, sp_size: int = 1,
                      gpus_per_node: int | None = None) -> RolloutPlacement:
    """The engines of ``world_size`` ranks with engines of ``tensor_parallel_size`` GPUs.

    ``sp_size`` only has to divide the world (the trainer's groups); engines ignore it. With
    ``gpus_per_node``, an engine must not span nodes (TP traffic is per token, NVLink-bound).
    """
    for name, value in (("world_size", world_size), ("tensor_parallel_size", tensor_parallel_size),
                        ("sp_size", sp_size)):
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if world_size % tensor_parallel_size:
        raise ValueError(f"rollout.tensor_parallel_size: {tensor_parallel_size} must divide the {world_size} ranks "
                         "(one engine per slice of ranks)")
    if world_size % sp_size:
        raise ValueError(f"distributed.sp_size: {sp_size} must divide the {world_size} ranks")
    if gpus_per_node is not None and gpus_per_node % tensor_parallel_size:
        raise ValueError(f"rollout.tensor_parallel_size: {tensor_parallel_size} must divide the {gpus_per_node} "
                         "GPUs of a node (an engine must not span nodes)")
    return RolloutPlacement(world_size, tensor_parallel_size)
