"""Reducing a per-token loss of a packed batch to the scalar that is back-propagated.

The tokens of B sequences lie end to end in one ``[total_tokens]`` tensor; ``cu_seqlens``
(``[B + 1]``, starting at 0, non-decreasing) marks where each sequence starts. ``loss_mask``
selects the tokens that carry loss (response tokens).

Modes (``LOSS_AGGREGATIONS``), with m the mask, l the token loss and b a sequence:

- ``token-mean``           sum_t m_t l_t / N_tokens                   (DAPO: every token weighs the same)
- ``seq-mean-token-mean``  sum_b [sum_{t in b} m_t l_t / n_b] / N_seqs (original GRPO)
- ``seq-mean-token-sum``   sum_b  sum_{t in b} m_t l_t / N_seqs

Under data or sequence parallelism each rank holds only part of the batch; pass the *global*
``N_tokens`` (all ranks' loss tokens) or ``N_seqs`` so that summing the ranks' results (as a
gradient all-reduce does) gives exactly the loss of the whole batch. Without them the local
counts are used. Only sequences with at least one loss token count in ``N_seqs``.
"""

from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` within each packed sequence: ``[total_tokens] -> [B]`` (differentiable)."""
    lengths = cu_seqlens.diff().to(device=values.device, dtype=torch.long)
    if values.dim() != 1 or values.numel() != int(cu_seqlens[-1]):
        raise ValueError(
            f"values: expected a 1-D tensor of {int(cu_seqlens[-1])} tokens (cu_seqlens[-1]), got {tuple(values.shape)}"
        )
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens: must be non-decreasing")
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    return torch.zeros(len(lengths), dtype=values.dtype, device=values.device).index_add(0, seq_of_token, values)


def aggregate_loss(
    token_loss: torch.Tensor,
    loss_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str = "token-mean",
    global_num_tokens: int | float | torch.Tensor | None = None,
    global_num_seqs: int | float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Scalar loss from per-token losses of a packed batch (see the module docstring for modes).

    Args:
        token_loss: ``[total_tokens]`` float loss of each token.
        loss_mask: ``[total_tokens]`` bool or 0/1 mask of tokens that carry loss.
        cu_seqlens: ``[B + 1]`` packed sequence offsets.
        mode: one of ``LOSS_AGGREGATIONS``.
        global_num_tokens: denominator for ``token-mean`` (defaults to the local mask count).
        global_num_seqs: denominator for the ``seq-mean-*`` modes (defaults to the local number of
            sequences with at least one loss token).
    Returns:
        0-dim tensor; 0 (with a gradient path) when no token carries loss.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"mode: expected one of {LOSS_AGGREGATIONS}, got {mode!r}")
    if loss_mask.shape != token_loss.shape:
        raise ValueError(f"loss_mask: shape {tuple(loss_mask.shape)} differs from token_loss {tuple(token_loss.shape)}")
    mask = loss_mask.to(token_loss.dtype)
    masked = token_loss * mask
    if mode == "token-mean":
        denominator = mask.sum() if global_num_tokens is None else global_num_tokens
        return masked.sum() / torch.as_tensor(denominator, dtype=token_loss.dtype).clamp(min=1)
    seq_loss = segment_sum(masked, cu_seqlens)
    seq_tokens = segment_sum(mask, cu_seqlens)
    if mode == "seq-mean-token-mean":
        seq_loss = seq_loss / seq_tokens.clamp(min=1)
    denominator = (seq_tokens > 0).sum() if global_num_seqs is None else global_num_seqs
    return seq_loss.sum() / torch.as_tensor(denominator, dtype=token_loss.dtype).clamp(min=1)
