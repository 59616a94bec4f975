"""Plain float64 attention over packed sequences with an explicit block-diagonal mask.

The ground truth for tests and the naive baseline for benchmarks: it builds the whole
``(total_q, total_k)`` mask and score matrix, so use it on small inputs only.

Masking follows FlashAttention: query ``i`` of a sequence with ``q_len`` queries and
``k_len`` keys sits at key position ``i + k_len - q_len`` (bottom-right alignment) and may
attend key ``j`` when ``i + k_len - q_len - left <= j <= i + k_len - q_len + right``, where
``(left, right) = window_size`` with ``-1`` meaning unbounded and ``causal`` forcing
``right = 0``. A query that may attend no key gets output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import math

import torch


def block_diagonal_mask(cu_seqlens_q, cu_seqlens_k, causal: bool, window_size=(-1, -1)) -> torch.Tensor:
    """Boolean ``(total_q, total_k)``: True where a query may attend a key."""
    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    left, right = window_size
    if causal:
        right = 0
    mask = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for b in range(len(cu_q) - 1):
        q_len, k_len = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        diagonal = torch.arange(q_len)[:, None] + (k_len - q_len)  # key position of each query
        keys = torch.arange(k_len)[None, :]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool)
        if right >= 0:
            allowed &= keys <= diagonal + right
        if left >= 0:
            allowed &= keys >= diagonal - left
        mask[cu_q[b] : cu_q[b + 1], cu_k[b] : cu_k[b + 1]] = allowed
    return mask


def attention_reference(
    q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=True, window_size=(-1, -1), dtype=torch.float64
):
    """Returns ``(out, lse)``: out ``(total_q, heads, head_dim)`` and lse ``(heads, total_q)``.

    Computes and returns in ``dtype`` (float64 for ground truth; the inputs' own dtype gives
    the "same computation in plain PyTorch" that FlashAttention's error rule compares against).
    Differentiable through plain autograd.
    """
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = heads // kv_heads
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    kc = kc.repeat_interleave(group, dim=1)
    vc = vc.repeat_interleave(group, dim=1)
    mask = block_diagonal_mask(cu_seqlens_q.cpu(), cu_seqlens_k.cpu(), causal, window_size).to(q.device)
    scores = torch.einsum("qhd,khd->hqk", qc, kc) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with no allowed key
    # softmax of an all-masked row is NaN: zero it (the where also zeroes its gradient)
    probs = torch.where(mask, torch.softmax(scores, dim=-1), 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, vc)
    return out, lse
