"""Drop-in functions with verl's signatures, on qwenlong kernels (tested against verl 0.9).

Nothing here imports verl at module load, so the functions also serve code that only copies
verl's conventions; :func:`install` puts them into a verl worker:

- :func:`linear_cross_entropy` / :class:`FusedLinearForPPO`: verl's fused LM-head kernels
  (``verl.utils.kernel.linear_cross_entropy``, ``verl.utils.experimental.torch_functional``):
  per-token ``log p(label)`` and entropy at a temperature from hidden states, i.e. what
  ``logprobs_from_logits(logits / T, labels)`` and ``entropy_from_logits(logits / T)`` give,
  without the logits. verl's fused model forward (``use_fused_kernels``, backends "triton" and
  "torch") imports them inside each call, so :func:`install` swaps them in by assigning the two
  module attributes.
- :func:`compute_policy_loss_vanilla`: verl's registered ``"vanilla"`` policy loss (PPO's clipped
  surrogate with dual clip) built from our per-token policy math, with verl's registry signature;
  :func:`install` registers it as ``"qwenlong"``. :func:`agg_loss` is verl's ``loss_agg_mode``
  reduction with its global-batch arguments; :func:`compute_policy_loss` the deprecated
  stand-alone form.
- :func:`compute_score`: our hybrid reward with verl's ``custom_reward_function`` signature
  (``custom_reward_function.path=pkg://qwenlong.integrations.verl``, ``name=compute_score``).
"""

from __future__ import annotations

import warnings

import torch

from qwenlong.kernels import linear_logprobs
from qwenlong.kernels.logprobs.policy_math import (
    LOSS_AGGREGATIONS,
    aggregate_tokens,
    clip_fractions,
    loss_normalizer,
    masked_mean,
    policy_loss_per_token,
)

__all__ = [
    "FusedLinearForPPO", "agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla", "compute_score", "install",
    "linear_cross_entropy",
]

LOSS_AGG_MODES = LOSS_AGGREGATIONS  # verl 0.9's five modes
LOG_RATIO_LIMIT = 20.0  # verl clamps log(pi / pi_old) to +-20 before exponentiating
# the keyword arguments verl's reward managers add when a reward model is configured (reward_loop)
VERL_REWARD_MODEL_KWARGS = ("reward_router_address", "reward_model_tokenizer")


def compute_score(data_source: str, solution_str: str, ground_truth, extra_info=None, **kwargs) -> float:
    """verl's ``custom_reward_function`` signature on our hybrid reward (:func:`qwenlong.rewards.compute_score`).

    verl passes ``reward_router_address`` and ``reward_model_tokenizer`` when a verl reward model
    is configured: they are accepted, but our judge is the one set by ``QWENLONG_JUDGE_URL`` /
    ``set_default_reward`` (a warning says so). Any other keyword (e.g. from
    ``custom_reward_function.reward_kwargs``) raises ``TypeError``: nothing here would read it.
    """
    unknown = sorted(set(kwargs) - set(VERL_REWARD_MODEL_KWARGS))
    if unknown:
        raise TypeError(f"compute_score: unexpected keyword arguments {unknown} (reward_kwargs are not used; "
                        f"configure the judge with QWENLONG_JUDGE_URL or qwenlong.rewards.set_default_reward)")
    if kwargs.get("reward_router_address") is not None:
        warnings.warn("compute_score: verl's reward model (reward_router_address) is not used; qwenlong's judge is "
                      "the one set by QWENLONG_JUDGE_URL or set_default_reward", stacklevel=2)
    # the reward belongs to the training layer: imported when called, so the kernel drop-ins load without it
    from qwenlong.rewards import compute_score as hybrid_score

    return hybrid_score(data_source, solution_str, ground_truth, extra_info)


def install(policy_loss_name: str | None = "qwenlong", fused_kernels: bool = True) -> None:
    """Put qwenlong's functions into this process's verl (call it in each worker, before the model is built).

    ``policy_loss_name``: register :func:`compute_policy_loss_vanilla` in verl's policy-loss registry
    under this name (select it with ``actor_rollout_ref.actor.policy_loss.loss_mode=<name>``); None
    skips it. ``fused_kernels``: replace verl's ``linear_cross_entropy`` (its "triton" fused
    backend) and ``FusedLinearForPPO`` (its "torch" backend) by ours; they take effect with
    ``actor_rollout_ref.model.use_fused_kernels=True``.
    """
    if policy_loss_name is not None:
        from verl.trainer.ppo.core_algos import register_policy_loss

        register_policy_loss(policy_loss_name)(compute_policy_loss_vanilla)
    if fused_kernels:
        import verl.utils.experimental.torch_functional as verl_torch_functional
        import verl.utils.kernel.linear_cross_entropy as verl_linear_cross_entropy

        verl_linear_cross_entropy.linear_cross_entropy = linear_cross_entropy
        verl_torch_functional.FusedLinearForPPO = FusedLinearForPPO


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
    ``(log_probs, entropy)`` as verl does: log-probs in fp32, the entropy in the dtype of
    ``hidden_states``. Our kernel tiles the vocabulary itself, so ``chunk_size`` is unused;
    ``impl_backend`` ("torch" or "liger", verl's choice of implementation) is checked as verl
    checks it and then unused: this class is the implementation.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"impl_backend must be 'torch' or 'liger' (verl's names), got {impl_backend!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0):
        logp, entropy = _flat_logprobs_and_entropy(hidden_states, vocab_weights, input_ids.long(), temperature)
        return logp, entropy.to(hidden_states.dtype)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """verl's reduction of a ``(batch, response_length)`` loss over the tokens where ``loss_mask`` is set.

    The global-batch arguments are those verl's actor puts in ``config.global_batch_info``: each
    micro batch's loss is its share of the global batch's, times ``dp_size`` (data-parallel
    training averages the ranks' gradients). Sequences without a loss token do not count.

    - token-mean: token sum / ``batch_num_tokens`` (default: this batch's token count);
    - token-sum: token sum;
    - seq-mean-token-sum: sum of per-sequence token sums / ``global_batch_size`` (default: the
      sequences here with a loss token);
    - seq-mean-token-mean: the same with per-sequence token means;
    - seq-mean-token-sum-norm: seq-mean-token-sum / ``loss_scale_factor`` (default: ``response_length``;
      Dr. GRPO's constant normalizer).

    The defaults describe this batch alone, so with ``dp_size > 1`` the global count must be given.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    keep = loss_mask.bool()
    count = batch_num_tokens if loss_agg_mode == "token-mean" else global_batch_size
    if count is None and dp_size > 1 and loss_agg_mode != "token-sum":
        name = "batch_num_tokens" if loss_agg_mode == "token-mean" else "global_batch_size"
        raise ValueError(f"{name}: the global count is needed with dp_size={dp_size} ({loss_agg_mode})")
    lengths = keep.sum(-1, keepdim=True).expand_as(loss_mat).to(loss_mat.dtype)
    tokens = batch_num_tokens if batch_num_tokens is not None else keep.sum()
    sequences = global_batch_size if global_batch_size is not None else (keep.sum(-1) > 0).sum()
    scale = loss_scale_factor if loss_scale_factor is not None else loss_mask.shape[-1]
    loss = aggregate_tokens(loss_mat, keep, loss_normalizer(loss_agg_mode, tokens, sequences, lengths, scale))
    return loss * dp_size


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
    3.0), the per-token losses multiplied by ``rollout_is_weights`` (verl's rollout correction)
    when given, and the reduction :func:`agg_loss` with ``config.global_batch_info`` (which verl's
    actor fills per micro batch). Returns ``(pg_loss, metrics)`` with verl's metric names.
    """
    if config is None:
        raise ValueError("config: verl's actor config (clip_ratio, clip_ratio_low, clip_ratio_high) is needed")
    clip_low = config.clip_ratio if getattr(config, "clip_ratio_low", None) is None else config.clip_ratio_low
    clip_high = config.clip_ratio if getattr(config, "clip_ratio_high", None) is None else config.clip_ratio_high
    per_token, clipfrac, ppo_kl, clipfrac_lower = _dual_clip_losses(
        old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, getattr(config, "clip_ratio_c", 3.0))
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights
    metrics = {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
               "actor/pg_clipfrac_lower": clipfrac_lower.item()}
    global_batch_info = getattr(config, "global_batch_info", None) or {}
    return agg_loss(per_token, response_mask, loss_agg_mode, **global_batch_info), metrics
