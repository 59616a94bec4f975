"""qwenlong.kernels: drop-in fused ops for long-context training. torch + triton only.

Every public op picks its path from the tensors it is given (see :mod:`.backend`): Triton
on CUDA tensors, the CUDA extension where one exists, and a memory-efficient PyTorch
implementation on CPU tensors. Ops load on first use, so importing this package is cheap
and ``TRITON_INTERPRET`` can still be set before any kernel is defined.
"""

from __future__ import annotations

import importlib

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    "backend": ".backend",
    "pack_by_token_budget": ".packing",
    "balance_partitions": ".packing",
    "balance_and_pack": ".packing",
    "build_cu_seqlens": ".packing",
    "build_position_ids": ".packing",
    "apply_rotary_packed": ".rotary",
    "varlen_attention": ".attention",
    "flash_attn_varlen_func": ".attention",
    "linear_logprobs": ".logprobs",
    "linear_cross_entropy": ".logprobs",
    "grpo_loss": ".logprobs",
    "ulysses_attention": ".sequence_parallel",
    "sp_linear_logprobs": ".sequence_parallel",
    "sp_grpo_loss": ".sequence_parallel",
    "shard_packed_batch": ".sequence_parallel",
    "gather_per_token": ".sequence_parallel",
    "next_token_labels": ".sequence_parallel",
    "new_sequence_parallel_groups": ".sequence_parallel",
    "ShardedBatch": ".sequence_parallel",
    "sequence_parallel": ".sequence_parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'qwenlong.kernels' has no attribute {name!r}")
    module = importlib.import_module(module_name, __name__)
    value = module if module_name.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
