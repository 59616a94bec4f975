"""Plain PyTorch references on materialized logits (float64 by default) for the fused ops.

They hold the whole T x V logits and exist only for tests and benchmarks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_log_softmax(hidden, weight, temperature=1.0, dtype=torch.float64):
    """``log_softmax(hidden @ weight.T / temperature)`` computed in ``dtype``: (T, V)."""
    return torch.log_softmax((hidden.to(dtype) @ weight.to(dtype).T) / temperature, dim=-1)


def reference_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100,
                              dtype=torch.float64):
    log_probs = reference_log_softmax(hidden, weight, temperature, dtype)
    valid = targets != ignore_index
    logp = log_probs.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    entropy = torch.where(valid, -(log_probs.exp() * log_probs).sum(dim=-1), 0.0)
    return logp, entropy


def reference_linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                   dtype=torch.float64):
    logits = hidden.to(dtype) @ weight.to(dtype).T
    return F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def reference_grpo_loss(hidden, weight, targets, advantages, old_logprobs, mask, *, ref_logprobs=None, clip_low=0.2,
                        clip_high=0.28, dual_clip=None, kl_coef=0.0, entropy_coef=0.0, temperature=1.0,
                        num_tokens=None, dtype=torch.float64):
    """The GRPO objective written out term by term (PPO surrogate maximised, so negated)."""
    logp, entropy = reference_linear_logprobs(hidden, weight, targets, temperature, True, dtype=dtype)
    adv = advantages.to(dtype)
    ratio = torch.exp(logp - old_logprobs.to(dtype))
    objective = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if dual_clip is not None:
        objective = torch.where(adv < 0, torch.maximum(objective, dual_clip * adv), objective)
    per_token = -objective - entropy_coef * entropy
    if kl_coef:
        diff = ref_logprobs.to(dtype) - logp
        per_token = per_token + kl_coef * (torch.exp(diff) - diff - 1)
    weights = mask.to(dtype)
    if num_tokens is None:
        num_tokens = weights.sum()
    if isinstance(num_tokens, torch.Tensor):
        num_tokens = num_tokens.to(dtype)
    return (per_token * weights / num_tokens).sum()
