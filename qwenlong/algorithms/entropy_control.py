"""Entropy control of QwenLong-L1.5 (l15.md section 4): negative-gradient clipping and AEPO.

Both act on which responses / tokens carry policy-gradient loss; neither changes an advantage.
The per-token entropies are the full-vocabulary entropies ``H_t = -sum_v p_v log p_v`` at each
sampled position, as the fused kernel returns them
(``qwenlong.kernels.linear_logprobs(..., return_entropy=True)``: no logits are materialised).

Negative-gradient clipping. A token t of response i is dropped from the loss when

    A_i < 0  and  ( H_t > tau_token   or   mean_t' H_t' of response i > tau_sequence )

(token level and sequence level; either threshold may be off). Pushing down tokens where the
policy is already uncertain spreads probability mass further and drives entropy up.

AEPO (adaptive entropy-controlled policy optimisation). The batch entropy is the mean over the
batch's responses of each response's mean token entropy. Against a target range
``[entropy_low, entropy_high]`` a mode is kept with hysteresis:

- batch entropy > entropy_high  ->  ``positive-only``: responses with A <= 0 (or reward <= 0, as in
  the published snippet) are masked out, so the update only sharpens rewarded behaviour;
- batch entropy < entropy_low   ->  ``all``: negative samples are used again;
- in between                    ->  the previous mode persists.

The mode is chosen from the current batch's entropy and applied to that batch.

A response is what one advantage belongs to: one sequence in GRPO, a whole trajectory (every policy
call of it) for the memory agent, whose sequences :func:`response_entropy_sums` adds up.
"""

from __future__ import annotations

import torch

from qwenlong.algorithms import segment_sum

AEPO_MODES = ("all", "positive-only")


def response_mean_entropy(token_entropy: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Mean token entropy of each packed response over its loss tokens.

    Args:
        token_entropy: ``[total_tokens]`` entropy at each position of a packed batch.
        mask: ``[total_tokens]`` bool or 0/1, the positions that predict a response token.
        cu_seqlens: ``[B + 1]`` packed sequence offsets.
    Returns:
        ``[B]`` float: ``sum_{t in b} m_t H_t / sum_{t in b} m_t`` (0 for a sequence without loss tokens).
    """
    sequences = cu_seqlens.numel() - 1
    owners = torch.arange(sequences, device=token_entropy.device)  # each sequence its own response
    sums = response_entropy_sums(token_entropy, mask, cu_seqlens, owners, sequences)
    return (sums[0] / sums[1].clamp(min=1)).to(token_entropy.dtype)


def response_entropy_sums(token_entropy: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor,
                          owners: torch.Tensor, num_responses: int) -> torch.Tensor:
    """Entropy sums and loss-token counts of responses made of several packed sequences.

    A memory-agent trajectory is one response whose generated tokens lie in several sequences (one per
    policy call), which a step may pack into different micro-batches on different ranks: their sums add up,
    and a response's mean entropy is ``sums[0] / sums[1]`` once every part is in.

    Args:
        token_entropy, mask: ``[total_tokens]`` as in :func:`response_mean_entropy`.
        cu_seqlens: ``[B + 1]`` packed sequence offsets (sequences past ``len(owners)``, e.g. padding, are left out).
        owners: ``[S]`` int, the response each of the first ``S <= B`` sequences is part of.
        num_responses: how many responses the owners index.
    Returns:
        ``[2, num_responses]`` float64: each response's sum of ``m_t H_t`` and of ``m_t`` over these sequences.
    """
    if mask.shape != token_entropy.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} differs from token_entropy {tuple(token_entropy.shape)}")
    weights = mask.to(torch.float64)
    parts = torch.stack([segment_sum(token_entropy.to(torch.float64) * weights, cu_seqlens),
                         segment_sum(weights, cu_seqlens)])[:, :owners.numel()]
    sums = torch.zeros(2, num_responses, dtype=torch.float64, device=token_entropy.device)
    return sums.index_add_(1, owners.to(token_entropy.device), parts)


def batch_entropy(response_entropy: torch.Tensor) -> torch.Tensor:
    """AEPO's batch entropy ``H(pi, B)``: the mean over responses of their mean token entropy.

    Args:
        response_entropy: ``[N]`` mean token entropy of every response of the batch (all ranks'),
            e.g. from :func:`response_mean_entropy`.
    Returns:
        0-dim tensor (0 for an empty batch).
    """
    if response_entropy.dim() != 1:
        raise ValueError(f"response_entropy: expected a 1-D tensor, got shape {tuple(response_entropy.shape)}")
    if response_entropy.numel() == 0:
        return response_entropy.new_zeros(())
    return response_entropy.mean()


def negative_gradient_keep(
    advantages: torch.Tensor,
    token_entropy: torch.Tensor,
    response_entropy: torch.Tensor,
    tau_token: float | None = None,
    tau_sequence: float | None = None,
) -> torch.Tensor:
    """The indicator I(i, t) of negative-gradient clipping, per token (True: the token keeps its loss).

        I = 0  where  A < 0  and  (H_t > tau_token  or  H_bar_i > tau_sequence),  else 1

    Args:
        advantages: ``[T]`` advantage of each token's response.
        token_entropy: ``[T]`` entropy at each token.
        response_entropy: ``[T]`` mean token entropy of each token's response (broadcast to its tokens).
        tau_token: token-level threshold; None turns the token level off.
        tau_sequence: sequence-level threshold; None turns the sequence level off.
    Returns:
        ``[T]`` bool. Combine with the response mask (``mask & keep``) before the loss.
    """
    if token_entropy.shape != advantages.shape or response_entropy.shape != advantages.shape:
        raise ValueError(f"token_entropy, response_entropy: expected shape {tuple(advantages.shape)} (advantages), "
                         f"got {tuple(token_entropy.shape)} and {tuple(response_entropy.shape)}")
    for name, tau in (("tau_token", tau_token), ("tau_sequence", tau_sequence)):
        if tau is not None and not tau >= 0:
            raise ValueError(f"{name}: expected a threshold >= 0 or None, got {tau}")
    uncertain = torch.zeros_like(advantages, dtype=torch.bool)
    if tau_token is not None:
        uncertain |= token_entropy > tau_token
    if tau_sequence is not None:
        uncertain |= response_entropy > tau_sequence
    return ~((advantages < 0) & uncertain)


def check_entropy_bounds(entropy_low: float, entropy_high: float) -> None:
    """ValueError unless ``0 <= entropy_low <= entropy_high``."""
    if not 0 <= entropy_low <= entropy_high:
        raise ValueError(f"entropy_low, entropy_high: expected 0 <= entropy_low <= entropy_high, "
                         f"got {entropy_low} and {entropy_high}")


def aepo_mode(previous: str, entropy: float, entropy_low: float, entropy_high: float) -> str:
    """AEPO's mode for a batch of entropy ``entropy``, given the mode of the previous step.

    ``positive-only`` when ``entropy > entropy_high``, ``all`` when ``entropy < entropy_low``,
    ``previous`` otherwise (hysteresis: the mode only flips on leaving the target range).
    """
    if previous not in AEPO_MODES:
        raise ValueError(f"previous: expected one of {AEPO_MODES}, got {previous!r}")
    check_entropy_bounds(entropy_low, entropy_high)
    if entropy > entropy_high:
        return "positive-only"
    if entropy < entropy_low:
        return "all"
    return previous


def aepo_keep(mode: str, advantages: torch.Tensor, rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Which responses train under AEPO's ``mode`` (True: kept).

    ``all`` keeps every response. ``positive-only`` keeps responses with ``A > 0`` and, when
    ``rewards`` are given, ``reward > 0`` (the published snippet's extra condition).

    Args:
        mode: one of ``AEPO_MODES``.
        advantages: ``[N]`` one advantage per response.
        rewards: ``[N]`` the responses' rewards, or None.
    Returns:
        ``[N]`` bool.
    """
    if mode not in AEPO_MODES:
        raise ValueError(f"mode: expected one of {AEPO_MODES}, got {mode!r}")
    if rewards is not None and rewards.shape != advantages.shape:
        raise ValueError(f"rewards: shape {tuple(rewards.shape)} differs from advantages {tuple(advantages.shape)}")
    if mode == "all":
        return torch.ones_like(advantages, dtype=torch.bool)
    keep = advantages > 0
    if rewards is not None:
        keep &= rewards > 0
    return keep
