"""Ulysses sequence-parallel attention over packed variable-length sequences.

Each of the P ranks holds a contiguous shard of the packed tokens with every head. Attention
needs whole sequences, so one all-to-all trades the token shard for a head shard:

    (T/P, H, d) on every rank  --all_to_all-->  (T, H/P, d)  --varlen_attention-->  (T, H/P, d)
                               <--all_to_all--

Rank r computes heads ``[r H/P, (r+1) H/P)`` of all T tokens, exactly as one process would,
so outputs and gradients match single-process attention (the backward of each all-to-all is
the reverse all-to-all). With grouped-query attention the KV heads are split the same way;
when P does not divide the KV head count, each KV head is first repeated
``P / gcd(kv_heads, P)`` times, the fewest copies that give every rank whole KV heads for its
query heads (H divisible by P and by kv_heads implies H is divisible by lcm(kv_heads, P)).
"""

from __future__ import annotations

import math

import torch

from ..attention import varlen_attention
from ..utils.checks import check_cu_seqlens, check_same_device, check_tensor, tensor_checks_enabled
from .comm import all_to_all, group_size


def kv_head_repeats(heads: int, kv_heads: int, world: int) -> int:
    """How many times each KV head is repeated so ``world`` ranks each get whole KV heads."""
    if heads % world != 0:
        raise ValueError(
            f"the number of attention heads ({heads}) must be divisible by the sequence-parallel size ({world})"
        )
    if kv_heads < 1 or heads % kv_heads != 0:
        raise ValueError(f"the number of query heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return world // math.gcd(kv_heads, world)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    group=None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
):
    """Attention of this rank's token shard against whole sequences spread over ``group``.

    Args:
        q: ``(local_tokens, heads, head_dim)``, this rank's contiguous slice of the packed tokens.
        k, v: ``(local_tokens, kv_heads, head_dim)``.
        cu_seqlens: int32 ``(batch + 1,)`` of the *whole* packed batch, ending at
            ``P * local_tokens`` (``shard_packed_batch`` pads and returns it).
        max_seqlen: longest sequence of the whole batch.
        group: the sequence-parallel process group (None: the default group).
        causal, softmax_scale, window_size: as in ``varlen_attention``.
        return_lse: also return the fp32 log-sum-exp ``(heads, local_tokens)``.

    Returns ``out`` ``(local_tokens, heads, head_dim)`` [and ``lse``].
    """
    check_tensor("q", q, ndim=3)
    check_tensor("k", k, ndim=3)
    check_tensor("v", v, ndim=3)
    check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k and v must have shape (local_tokens, kv_heads, head_dim) matching q {tuple(q.shape)}, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    world = group_size(group)
    local_tokens, heads, _ = q.shape
    repeats = kv_head_repeats(heads, k.shape[1], world)
    # its contents are read on the host only where that costs no wait (CPU, or QWENLONG_CHECK_TENSORS=1): on a
    # GPU varlen_attention validates them once per batch (its cached plan), not once per layer here
    if tensor_checks_enabled(cu_seqlens):
        check_cu_seqlens("cu_seqlens", cu_seqlens, world * local_tokens)
    else:
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)

    # tokens sharded, all heads  ->  all tokens, heads sharded
    q, k, v = (all_to_all(t, group, scatter_dim=1, gather_dim=0) for t in (q, k, v))
    result = varlen_attention(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, return_lse=return_lse,
    )
    out, lse = result if return_lse else (result, None)
    out = all_to_all(out, group, scatter_dim=0, gather_dim=1)
    if not return_lse:
        return out
    return out, all_to_all(lse, group, scatter_dim=1, gather_dim=0)
