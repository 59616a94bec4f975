"""flash-attn's padding helpers (``flash_attn.bert_padding``), in plain PyTorch, with its signatures."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["index_first_axis", "pad_input", "rearrange", "unpad_input"]


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The rows ``indices`` of a ``(total, ...)`` tensor."""
    return input[indices]


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """``(batch, seqlen, ...)`` -> the tokens where ``attention_mask`` is set, in order, and their layout:
    ``(tokens, indices, cu_seqlens, max_seqlen_in_batch, seqused)``."""
    if unused_mask is not None:
        raise NotImplementedError("unused_mask is not part of this stand-in")
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    tokens = index_first_axis(rearrange(hidden_states, "b s ... -> (b s) ..."), indices)
    return tokens, indices, cu_seqlens, int(seqlens.max().item()), seqlens


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """The inverse of :func:`unpad_input`: ``(tokens, ...)`` back to ``(batch, seqlen, ...)``, zeros elsewhere."""
    output = hidden_states.new_zeros(batch * seqlen, *hidden_states.shape[1:])
    output[indices] = hidden_states
    return rearrange(output, "(b s) ... -> b s ...", b=batch)
