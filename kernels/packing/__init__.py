"""Packing sequences into token-budget micro-batches, balancing them across data-parallel
ranks, and building the index tensors of a packed batch. C++ in ``qwenlong._C.host``;
:mod:`.reference` is the pure-Python twin (test reference and fallback)."""

from .api import balance_and_pack, balance_partitions, pack_by_token_budget, partition_costs
from .builders import build_cu_seqlens, build_position_ids

__all__ = [
    "balance_and_pack",
    "balance_partitions",
    "build_cu_seqlens",
    "build_position_ids",
    "pack_by_token_budget",
    "partition_costs",
]
