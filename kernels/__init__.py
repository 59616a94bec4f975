"""qwenlong.kernels: drop-in fused ops for long-context training. torch + triton only.

Every public op picks its path from the tensors it is given, in one place (:mod:`.backend`): Triton
on CUDA tensors, the CUDA extension where one exists, and a memory-efficient PyTorch
implementation on CPU tensors. Under ``TRITON_INTERPRET=1`` (set it before importing this package:
Triton reads it when a kernel is defined) CPU tensors run the Triton kernels in the interpreter.
"""

from __future__ import annotations

from . import backend, sequence_parallel
from .attention import flash_attn_varlen_func, varlen_attention
from .logprobs import grpo_loss, linear_cross_entropy, linear_logprobs
from .packing import (
    balance_and_pack,
    balance_partitions,
    build_cu_seqlens,
    build_position_ids,
    pack_by_token_budget,
)
from .rotary import apply_rotary_packed
from .sequence_parallel import (
    ShardedBatch,
    gather_per_token,
    new_sequence_parallel_groups,
    next_token_labels,
    shard_packed_batch,
    sp_grpo_loss,
    sp_linear_logprobs,
    ulysses_attention,
)

__all__ = [
    "ShardedBatch",
    "apply_rotary_packed",
    "backend",
    "balance_and_pack",
    "balance_partitions",
    "build_cu_seqlens",
    "build_position_ids",
    "flash_attn_varlen_func",
    "gather_per_token",
    "grpo_loss",
    "linear_cross_entropy",
    "linear_logprobs",
    "new_sequence_parallel_groups",
    "next_token_labels",
    "pack_by_token_budget",
    "sequence_parallel",
    "shard_packed_batch",
    "sp_grpo_loss",
    "sp_linear_logprobs",
    "ulysses_attention",
    "varlen_attention",
]
