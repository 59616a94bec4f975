"""Per-token GRPO / DAPO math on log-probabilities (method.md section 2).

Small pure tensor functions, shared by :func:`grpo_loss` and the training layer. Every
argument is a tensor of per-token values with one shape; nothing here reduces over tokens
except :func:`aggregate_tokens`.
"""

from __future__ import annotations

import torch

# |log(pi / pi_old)| and |log(pi_ref / pi)| beyond this are clamped before ``exp``: a ratio of
# e^20 already saturates every clip, and an unclamped one overflows to inf (then NaN gradients).
MAX_LOG_RATIO = 20.0
# The k3 KL of one token is clamped to [-KL_CLAMP, KL_CLAMP] (as verl's low_var_kl), so a token the
# reference finds nearly impossible cannot dominate the loss.
KL_CLAMP = 10.0


def policy_loss_per_token(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate loss ``-min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A)`` per token.

    ``rho = exp(clamp(logprobs - old_logprobs, -MAX_LOG_RATIO, MAX_LOG_RATIO))``.
    ``clip_high > clip_low`` is DAPO's clip-higher.
    With ``dual_clip = c`` (c > 1, Ye et al. 2020) the loss of a token with ``A < 0`` is also
    capped at ``-c*A``, so a huge ratio on a bad token cannot blow the loss up.
    Returns ``(loss, ratio)``.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
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
    """k3 estimator of KL(policy || reference) per token: ``exp(d) - d - 1`` with ``d = ref - logp``.

    Non-negative, zero where the two agree, and unbiased for samples drawn from the policy wherever neither
    clamp acts: ``d`` is clamped to ``[-MAX_LOG_RATIO, MAX_LOG_RATIO]`` and the result to ``[-KL_CLAMP, KL_CLAMP]``
    (verl's ``low_var_kl``), so one token the reference finds nearly impossible cannot dominate.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    kl = torch.expm1(log_ratio) - log_ratio  # exp(d) - 1 - d without cancellation for small d
    return kl.clamp(-KL_CLAMP, KL_CLAMP)


def aggregate_tokens(per_token: torch.Tensor, mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    """``sum_t mask_t * per_token_t / n_t``: the loss reduction over tokens. ``mask`` is bool or holds 0s and 1s
    (it selects tokens; any nonzero value counts as 1: :func:`grpo_loss` refuses other values).

    ``num_tokens``:
    - None: ``n_t = sum(mask)`` (local token mean; an empty mask gives 0);
    - a number or 0-d tensor: ``n_t = num_tokens`` for every token (token-level mean over a
      global count, e.g. all data- and sequence-parallel ranks);
    - a tensor shaped like ``per_token``: ``n_t = num_tokens[t]``. For the mean over
      ``B`` sequences of per-sequence token means pass ``B * len(sequence of t)`` at each token.

    Masked positions are selected away (``torch.where``), not multiplied by 0, so a NaN or inf at a
    masked token (e.g. an undefined old log-prob of a prompt position) never reaches the loss or its
    gradient.
    """
    keep = mask.bool()
    masked = torch.where(keep, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if num_tokens is None:
        return masked.sum() / keep.sum().clamp(min=1).to(per_token.dtype)
    if isinstance(num_tokens, torch.Tensor) and num_tokens.dim() > 0:
        denominator = torch.where(keep, num_tokens.to(per_token.dtype), torch.ones((), dtype=per_token.dtype,
                                                                                      device=per_token.device))
        return (masked / denominator).sum()
    return masked.sum() / num_tokens


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over tokens where ``mask`` is set (0 for an empty mask; masked values never read)."""
    keep = mask.bool()
    masked = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return masked.sum() / keep.sum().clamp(min=1).to(values.dtype)


LOSS_AGGREGATIONS = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _at_least_one(count):
    return count.clamp(min=1) if isinstance(count, torch.Tensor) else max(1, count)


def loss_normalizer(mode: str, num_tokens, num_sequences, sequence_tokens: torch.Tensor, scale_factor: float = 1.0):
    """What :func:`aggregate_tokens` divides each token's loss by, per loss aggregation ``mode``.

    - ``token-mean``: ``num_tokens``, every loss token of the (global) batch counts once (DAPO);
    - ``token-sum``: 1, the plain sum;
    - ``seq-mean-token-mean``: ``num_sequences * n_b`` at each token of sequence ``b``, the mean over
      sequences of each sequence's token mean (the original GRPO);
    - ``seq-mean-token-sum``: ``num_sequences``, the mean over sequences of each sequence's token sum;
    - ``seq-mean-token-sum-norm``: ``num_sequences * scale_factor`` (Dr. GRPO's constant normaliser, e.g.
      the response length limit).

    ``num_tokens`` and ``num_sequences`` (numbers or 0-d tensors) count the whole batch over every rank, so
    the ranks' losses add up to the batch's loss; only sequences with a loss token count. ``sequence_tokens``
    is a per-token tensor holding ``n_b``, the loss tokens of the token's sequence. Returns a number or a
    tensor shaped like ``sequence_tokens``. Used by the trainer and by every framework integration.
    """
    if mode == "token-mean":
        return _at_least_one(num_tokens)
    if mode == "token-sum":
        return 1
    if mode == "seq-mean-token-mean":
        return _at_least_one(num_sequences) * sequence_tokens.clamp(min=1.0)
    if mode == "seq-mean-token-sum":
        return torch.ones_like(sequence_tokens) * _at_least_one(num_sequences)
    if mode == "seq-mean-token-sum-norm":
        return torch.ones_like(sequence_tokens) * (_at_least_one(num_sequences) * scale_factor)
    raise ValueError(f"mode: expected one of {LOSS_AGGREGATIONS}, got {mode!r}")
