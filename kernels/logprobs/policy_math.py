"""Per-token GRPO / DAPO math on log-probabilities (method.md section 2).

Small pure tensor functions, shared by :func:`grpo_loss` and the training layer. Every
argument is a tensor of per-token values with one shape; nothing here reduces over tokens
except :func:`aggregate_tokens`.
"""

from __future__ import annotations

import torch


def policy_loss_per_token(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss ``-min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A)`` per token.

    ``rho = exp(logprobs - old_logprobs)``. ``clip_high > clip_low`` is DAPO's clip-higher.
    With ``dual_clip = c`` (c > 1, Ye et al. 2020) the loss of a token with ``A < 0`` is also
    capped at ``-c*A``, so a huge ratio on a bad token cannot blow the loss up.
    Returns ``(loss, ratio)``.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss, ratio


def clip_fractions(
    ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token indicators (float) of an active clip: the clipped branch wins and has no gradient.

    low: ``A < 0`` and ``rho < 1 - clip_low``; high: ``A > 0`` and ``rho > 1 + clip_high``.
    """
    low = (advantages < 0) & (ratio < 1.0 - clip_low)
    high = (advantages > 0) & (ratio > 1.0 + clip_high)
    return low.float(), high.float()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(policy || reference) per token: ``exp(ref - logp) - (ref - logp) - 1``.

    Non-negative, unbiased for samples drawn from the policy, and zero where the two agree.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio  # exp(d) - 1 - d without cancellation for small d


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    """``sum_t mask_t * per_token_t / n_t``: the loss reduction over tokens.

    ``num_tokens``:
    - None: ``n_t = sum(mask)`` (local token mean; an empty mask gives 0);
    - a number or 0-d tensor: ``n_t = num_tokens`` for every token (token-level mean over a
      global count, e.g. all data- and sequence-parallel ranks);
    - a tensor shaped like ``per_token``: ``n_t = num_tokens[t]``. For the mean over
      ``B`` sequences of per-sequence token means pass ``B * len(sequence of t)`` at each token.
    """
    weights = mask.to(per_token.dtype)
    if num_tokens is None:
        return (per_token * weights).sum() / weights.sum().clamp(min=1.0)
    if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() > 0:
        return (per_token * weights / num_tokens.to(per_token.dtype)).sum()
    return (per_token * weights).sum() / num_tokens


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over tokens where ``mask`` is set (0 for an empty mask)."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)
