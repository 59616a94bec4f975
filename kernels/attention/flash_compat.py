"""``flash_attn_varlen_func`` with FlashAttention 2's signature, running our kernels.

Code written for ``flash_attn`` switches by changing one import. Options we do not
implement raise ``ValueError`` rather than being silently ignored.
A head size that is not a multiple of 8 is zero-padded to one, run and sliced back, as
FlashAttention 2 does (the default scale stays ``1/sqrt`` of the unpadded size).

``deterministic`` maps to :func:`~.varlen.varlen_attention`'s: ``True`` runs the 7-GEMM backward
(a dq kernel after the dk/dv kernel, no atomics: bitwise reproducible and packing-invariant),
``False`` the 5-GEMM one that adds dq into an fp32 buffer with atomics inside the dk/dv kernel,
as FlashAttention's own non-deterministic backward does. The default is ours, ``True``, not
flash-attn's ``False``: changing the import must not quietly make gradients run-to-run
dependent (RL log-prob recomputation and our tests rely on bitwise reproducibility); code that
wants flash-attn's faster behaviour passes ``deterministic=False``, as transformers' own
flash-attention path does unless ``FLASH_ATTENTION_DETERMINISTIC=1``. Our transformers
integration ignores that variable: ``attn_implementation="qwenlong"`` is deterministic,
``"qwenlong_atomic"`` the atomic backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
    deterministic=True,
    return_attn_probs=False,
    block_table=None,
):
    """FlashAttention 2's varlen entry point (note ``causal=False`` by default, as there; ``deterministic=True``
    by default, unlike there: see the module docstring).

    Returns ``out``; with ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``:
    FlashAttention's third item (the probabilities, documented there as for testing only and
    not guaranteed correct) is not materialized. ``softmax_lse`` is fp32 ``(heads, total_q)`` and
    differentiable. One difference: a query row that sees no key (``causal`` with a query sequence longer than
    its keys, or a window) gets ``softmax_lse = -inf``, the log of its empty sum, where FlashAttention 2's
    kernels write ``+inf``; merging partial results by their lse (``logaddexp``) needs ``-inf`` there.
    """
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: attention dropout is not supported, got {dropout_p}")
    if softcap != 0.0:
        raise ValueError(f"softcap must be 0.0: logit soft-capping is not supported, got {softcap}")
    if alibi_slopes is not None:
        raise ValueError("alibi_slopes must be None: ALiBi is not supported")
    if block_table is not None:
        raise ValueError("block_table must be None: a paged KV cache is not supported")
    head_dim = q.shape[-1] if isinstance(q, torch.Tensor) and q.dim() else None
    if head_dim and head_dim % 8 and all(isinstance(t, torch.Tensor) and t.shape[-1] == head_dim for t in (k, v)):
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(head_dim)
        q, k, v = (F.pad(t, (0, -head_dim % 8)) for t in (q, k, v))  # zeros add nothing to q.k, and 0 to o
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
        deterministic=deterministic,
    )
    out, lse = result if return_attn_probs else (result, None)
    if head_dim and out.shape[-1] != head_dim:
        out = out[..., :head_dim]
    return (out, lse, None) if return_attn_probs else out
