"""``ulysses_attention`` as a transformers attention implementation named ``"qwenlong_ulysses"``.

Each rank runs the model on its contiguous shard of one packed row; every attention layer
trades the token shard for a head shard (all-to-all), attends whole sequences with
``varlen_attention`` and trades back. Everything else in a decoder layer is per token and runs
on the shard unchanged. The function needs three keyword arguments that the model forwards to
its attention layers: ``sp_group`` and the *whole* padded row's ``cu_seq_lens_q`` /
``max_length_q`` (transformers' flash-attention names). ``apply_qwenlong(model,
sequence_parallel_group=...)`` and ``SequenceParallelCausalLM`` pass them.

No mask builder is registered under this name, so transformers hands the function no mask.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface

from qwenlong.kernels import ulysses_attention

ATTENTION_NAME = "qwenlong_ulysses"


def ulysses_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
):
    """transformers attention function: ``(1, heads, local_tokens, d)`` in, ``(1, local_tokens, heads, d)`` out."""
    if attention_mask is not None:
        raise ValueError("ulysses attention takes packed sequences described by cu_seqlens, not an attention_mask")
    if dropout > 0.0:
        raise ValueError(f"ulysses attention has no attention dropout, got dropout={dropout}")
    if query.shape[0] != 1:
        raise ValueError(f"packed sequences must come as a batch of one, got query shape {tuple(query.shape)}")
    if "sp_group" not in kwargs or "cu_seq_lens_q" not in kwargs:
        raise ValueError("ulysses attention needs sp_group and cu_seq_lens_q: call a model patched by "
                         "apply_qwenlong(model, sequence_parallel_group=...) or wrapped in SequenceParallelCausalLM")
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (local_tokens, heads, d)
    out = ulysses_attention(
        q, k, v, kwargs["cu_seq_lens_q"], kwargs["max_length_q"], kwargs["sp_group"],
        causal=kwargs.get("is_causal", getattr(module, "is_causal", True)), softmax_scale=scaling, window_size=window,
    )
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, ulysses_attention_forward)
