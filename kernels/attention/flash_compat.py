"""``flash_attn_varlen_func`` with FlashAttention 2's signature, running our kernels.

Code written for ``flash_attn`` switches by changing one import. Options we do not
implement raise ``ValueError`` rather than being silently ignored. Our backward is always
deterministic, so ``deterministic`` is accepted either way.
"""

from __future__ import annotations

from .varlen import varlen_attention


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """FlashAttention 2's varlen entry point (note ``causal=False`` by default, as there).

    Returns ``out``; with ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``:
    FlashAttention's third item (the probabilities, documented there as for testing only and
    not guaranteed correct) is not materialized. ``softmax_lse`` is fp32 ``(heads, total_q)``.
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: attention dropout is not supported, got {dropout_p}")
    if softcap != 0.0:
        raise ValueError(f"softcap must be 0.0: logit soft-capping is not supported, got {softcap}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None: ALiBi is not supported")
    if block_table is not None:
        raise ValueError("block_table must be None: a paged KV cache is not supported")
    result = varlen_attention(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=tuple(window_size),
        return_lse=return_attn_probs,
    )
    if return_attn_probs:
        out, lse = result
        return out, lse, None
    return result
