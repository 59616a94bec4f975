"""Per-token log-probs and the GRPO loss on sequence-parallel shards, with exact token-level normalization.

Each rank applies the fused LM-head ops to its own shard of final hidden states; no rank ever
holds another rank's hidden states or any logits. Labels must already be the next tokens of
the *full* packed batch (``next_token_labels`` before ``shard_packed_batch``), since a rank's
last label is the next rank's first token.

The token-level loss is ``sum over all response tokens of all ranks / N`` with N the global
count, so each rank divides its partial sum by N, all-reduced over the sequence-parallel and
data-parallel groups; the sum of the ranks' shares is then the same number for any SP degree
and any data-parallel split. The returned loss is that sum, replicated on every rank, and its
backward gives each rank the gradient of its own share (see ``comm.all_reduce_sum``).
"""

from __future__ import annotations

import torch

from ..logprobs import grpo_loss, linear_logprobs
from .comm import all_reduce_sum
from .shard import gather_per_token


def sp_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    group=None,
    *,
    num_tokens: int | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """Log-probs (and entropies) of the whole packed batch, computed shard by shard.

    ``hidden`` ``(local_tokens, d)`` and ``labels`` ``(local_tokens,)`` are this rank's shard;
    only the per-token fp32 results are all-gathered, then cut to ``num_tokens`` (the real
    token count, dropping the sharding padding; None keeps every gathered token, padding included:
    ``P * local_tokens``). Returns ``logp`` ``(num_tokens,)`` [, ``entropy``].
    """
    local = linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=return_entropy,
                            ignore_index=ignore_index)
    if not return_entropy:
        return gather_per_token(local, group, num_tokens)
    return tuple(gather_per_token(t, group, num_tokens) for t in local)


def global_token_count(mask: torch.Tensor, sp_group=None, dp_group=None) -> torch.Tensor:
    """Number of loss tokens over every rank of the SP group and of the data-parallel group (fp32, 0-d)."""
    return _sum_over(mask.detach().to(torch.float32).sum(), sp_group, dp_group)


def sp_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    sp_group=None,
    dp_group=None,
    **loss_options,
):
    """GRPO / DAPO token-level loss of the whole (SP x DP) batch from this rank's shard.

    Per-token arguments are this rank's shard (``shard_packed_batch``); ``loss_options`` are
    those of ``grpo_loss`` (``ref_logprobs``, ``clip_low``, ``clip_high``, ``dual_clip``,
    ``kl_coef``, ``entropy_coef``, ``temperature``). ``sp_group`` None is the default group;
    ``dp_group`` None means no data parallelism beyond it.

    Returns ``(loss, metrics)``: the global loss (the same on every rank; backward yields this
    rank's share of the parameter gradients, to be summed over SP and DP ranks) and the
    metrics of ``grpo_loss`` as token means over all ranks.
    """
    if "num_tokens" in loss_options:
        raise ValueError("sp_grpo_loss computes num_tokens itself (the global count over SP and DP ranks)")
    num_tokens = global_token_count(mask, sp_group, dp_group).clamp(min=1.0)  # no loss tokens anywhere: loss 0
    share, local_metrics = grpo_loss(hidden, weight, labels, advantages, old_logprobs, mask, num_tokens=num_tokens,
                                     **loss_options)
    return _sum_over(share, sp_group, dp_group), _global_means(local_metrics, mask, num_tokens, sp_group, dp_group)


def _sum_over(value: torch.Tensor, sp_group, dp_group) -> torch.Tensor:
    value = all_reduce_sum(value, sp_group)
    return value if dp_group is None else all_reduce_sum(value, dp_group)


def _global_means(local_means: dict, mask: torch.Tensor, num_tokens: torch.Tensor, sp_group, dp_group) -> dict:
    """Token means over every rank from each rank's masked means (one all-reduce for all metrics)."""
    names = sorted(local_means)
    if not names:
        return {}
    local_count = mask.detach().to(torch.float32).sum()
    sums = torch.stack([local_means[name].float() for name in names]) * local_count
    means = _sum_over(sums, sp_group, dp_group) / num_tokens
    return dict(zip(names, means.unbind(), strict=True))
