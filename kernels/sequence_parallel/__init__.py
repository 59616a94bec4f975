"""Ulysses sequence parallelism for packed variable-length batches.

``shard_packed_batch`` splits a packed batch into contiguous token shards (padding the total
to a multiple of the group size with a sequence of its own); ``ulysses_attention`` runs exact
per-sequence attention on the shards with two all-to-alls; ``sp_linear_logprobs`` and
``sp_grpo_loss`` apply the fused LM-head ops per shard with the global token count, so results
do not depend on the SP degree or the data-parallel split.
"""

from .comm import all_gather_tokens, all_reduce_sum, all_to_all, new_sequence_parallel_groups
from .logprobs import global_token_count, sp_grpo_loss, sp_linear_logprobs
from .shard import ShardedBatch, gather_per_token, next_token_labels, pad_cu_seqlens, shard_packed_batch
from .ulysses import kv_head_repeats, ulysses_attention

__all__ = [
    "ShardedBatch", "all_gather_tokens", "all_reduce_sum", "all_to_all", "gather_per_token", "global_token_count",
    "kv_head_repeats", "new_sequence_parallel_groups", "next_token_labels", "pad_cu_seqlens", "shard_packed_batch",
    "sp_grpo_loss", "sp_linear_logprobs", "ulysses_attention",
]
