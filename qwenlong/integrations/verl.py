"""Drop-in functions with verl's signatures, on qwenlong kernels.

verl is not a dependency (it is too heavy to install alongside this package), so nothing here
imports it: the signatures follow verl's API and the tests check the results against verl's
documented formulas.

- :func:`linear_cross_entropy` / :class:`FusedLinearForPPO`: verl's fused LM-head kernels
  (``verl.utils.kernel.linear_cross_entropy``, ``verl.utils.experimental.torch_functional``):
  per-token ``log p(label)`` and entropy at a temperature from hidden states, i.e. what
  ``logprobs_from_logits(logits / T, labels)`` and ``entropy_from_logits(logits / T)`` give,
  without the logits. verl's fused model forward (``use_fused_kernels``) imports them inside
  the call, so assigning ours to ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``
  and ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` in each worker swaps them
  in (untested here: verl is not installed).
- :func:`compute_policy_loss`: verl's PPO clipped loss with dual clip (``core_algos``), built
  from our per-token policy math; :func:`compute_policy_loss_vanilla` the same with the
  signature of verl's policy-loss registry; :func:`agg_loss` its ``loss_agg_mode`` reductions.
- :func:`compute_score`: our hybrid reward with verl's ``custom_reward_function`` signature.
"""

from __future__ import annotations

import torch

from qwenlong.kernels import linear_logprobs
from qwenlong.kernels.logprobs.policy_math import aggregate_tokens, clip_fractions, masked_mean, policy_loss_per_token

__all__ = [  # noqa: F822 (compute_score is a lazy module attribute)
    "FusedLinearForPPO", "agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla", "compute_score",
    "linear_cross_entropy",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
LOG_RATIO_LIMIT = 20.0  # verl clamps log(pi / pi_old) to +-20 before exponentiating


def __getattr__(name: str):
    # The reward belongs to the training layer (qwenlong.rewards): import it only when asked for, so the
    # kernel drop-ins of this module load without it.
    if name == "compute_score":
        from qwenlong.rewards import compute_score

        return compute_score
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flat_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float):
    """``(logp, entropy)`` fp32 shaped like ``labels``, for hidden ``(..., d)`` and labels ``(...)``."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                         f"got {tuple(labels.shape)}")
    logp, entropy = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                    float(temperature), return_entropy=True)
    return logp.view(labels.shape), entropy.view(labels.shape)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None):
    """verl's ``linear_cross_entropy``: ``(logprobs, entropy)`` of ``hidden @ weight.T / temperature``.

    hidden ``(T, d)`` or ``(B, S, d)``, weight ``(V, d)``, labels ``(T,)`` or ``(B, S)``.
    ``reduction`` reduces the log-probs ("none", "sum" or "mean"); the entropy stays per token.
    Both are fp32 and differentiable with respect to hidden and weight.
    """
    if dist_process_group is not None:
        raise NotImplementedError("dist_process_group: a vocabulary-parallel LM head is not supported; "
                                  "pass the full (V, d) weight")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    logp, entropy = _flat_logprobs_and_entropy(hidden, weight, labels, temperature)
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


class FusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO``: ``forward(hidden_states, vocab_weights, input_ids, temperature)``.

    ``input_ids`` are the tokens to score (verl passes the inputs rolled by one). Returns
    ``(log_probs, entropy)`` in the dtype of ``hidden_states``, as verl does; our kernel tiles
    the vocabulary itself, so ``chunk_size`` is accepted for compatibility and unused.
    """

    def __init__(self, chunk_size: int = 512):
        super().__init__()
        self.chunk_size = chunk_size

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0):
        logp, entropy = _flat_logprobs_and_entropy(hidden_states, vocab_weights, input_ids, temperature)
        return logp.to(hidden_states.dtype), entropy.to(hidden_states.dtype)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """verl's reductions of a ``(batch, response_length)`` loss over the tokens where ``loss_mask`` is set.

    token-mean: over all tokens; seq-mean-token-sum: per-sequence sums, averaged;
    seq-mean-token-mean: per-sequence means, averaged; seq-mean-token-sum-norm: the token sum
    divided by ``response_length`` (Dr. GRPO's constant normalizer).
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    num_sequences, length = loss_mat.shape
    if loss_agg_mode == "token-mean":
        return aggregate_tokens(loss_mat, loss_mask)
    if loss_agg_mode == "seq-mean-token-sum":
        return aggregate_tokens(loss_mat, loss_mask, num_sequences)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        return aggregate_tokens(loss_mat, loss_mask, length)
    lengths = loss_mask.to(loss_mat.dtype).sum(-1, keepdim=True).clamp(min=1.0)
    return aggregate_tokens(loss_mat, loss_mask, (num_sequences * lengths).expand_as(loss_mat))


def _dual_clip_losses(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c):
    """verl's per-token PPO loss with dual clip, and its metrics ``(pg_clipfrac, ppo_kl, pg_clipfrac_lower)``."""
    if not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}")
    if clip_low is None or clip_high is None:
        raise ValueError("cliprange (or both cliprange_low and cliprange_high) must be given")
    log_ratio = torch.clamp(log_prob - old_log_prob, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
    # the clamped log-ratio against a zero baseline: the same ratio, and no gradient where clamped, as in verl
    per_token, ratio = policy_loss_per_token(log_ratio, torch.zeros_like(log_ratio), advantages, clip_low, clip_high,
                                             dual_clip=clip_ratio_c)
    ratio = ratio.detach()
    low, high = clip_fractions(ratio, advantages, clip_low, clip_high)
    dual_clipped = (advantages < 0) & (ratio > clip_ratio_c)
    clipfrac = masked_mean((low + high).to(ratio.dtype), response_mask)
    ppo_kl = masked_mean(-log_ratio.detach(), response_mask)
    return per_token, clipfrac, ppo_kl, masked_mean(dual_clipped.to(ratio.dtype), response_mask)


def compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange=None, cliprange_low=None,
                        cliprange_high=None, clip_ratio_c=3.0, loss_agg_mode="token-mean"):
    """verl's ``compute_policy_loss``: PPO's clipped surrogate with dual clip ``clip_ratio_c``.

    All tensors are ``(batch, response_length)``. Per token, with ``rho = exp(clamp(logp - old, -20, 20))``:
    ``max(-A rho, -A clip(rho, 1 - low, 1 + high))``, and for ``A < 0`` at most ``-A c``.
    Returns ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``: the aggregated loss, the
    fraction of tokens where the clipped branch is taken, the mean of ``old - logp``, and the
    fraction where the dual clip is taken.
    """
    clip_low = cliprange if cliprange_low is None else cliprange_low
    clip_high = cliprange if cliprange_high is None else cliprange_high
    per_token, *metrics = _dual_clip_losses(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high,
                                            clip_ratio_c)
    return agg_loss(per_token, response_mask, loss_agg_mode), *metrics


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                config=None, rollout_is_weights=None):
    """verl's registered ``"vanilla"`` policy loss, with the signature of ``core_algos.register_policy_loss``.

    The loss of :func:`compute_policy_loss` with the clip settings of verl's actor ``config``
    (``clip_ratio``, ``clip_ratio_low`` / ``clip_ratio_high`` when set, ``clip_ratio_c``, default
    3.0) and the per-token losses multiplied by ``rollout_is_weights`` (verl's rollout correction)
    when given. Returns ``(pg_loss, metrics)`` with verl's metric names. In a verl worker,
    ``register_policy_loss("qwenlong")(compute_policy_loss_vanilla)`` and
    ``actor.policy_loss.loss_mode=qwenlong`` select it. The reductions are over the micro batch,
    as in verl's legacy engines; a non-empty ``config.global_batch_info`` (the new engine's
    normalization over the global batch) raises ``NotImplementedError``.
    """
    if config is None:
        raise ValueError("config: verl's actor config (clip_ratio, clip_ratio_low, clip_ratio_high) is needed")
    if getattr(config, "global_batch_info", None):
        raise NotImplementedError("config.global_batch_info: normalizing over the global batch (verl's new model "
                                  "engine) is not supported; the loss is reduced over the micro batch")
    clip_low = config.clip_ratio if getattr(config, "clip_ratio_low", None) is None else config.clip_ratio_low
    clip_high = config.clip_ratio if getattr(config, "clip_ratio_high", None) is None else config.clip_ratio_high
    per_token, clipfrac, ppo_kl, clipfrac_lower = _dual_clip_losses(
        old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, getattr(config, "clip_ratio_c", 3.0))
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights
    metrics = {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
               "actor/pg_clipfrac_lower": clipfrac_lower.item()}
    return agg_loss(per_token, response_mask, loss_agg_mode), metrics
