"""Fused linear cross-entropy for SFT: ``CE(hidden @ weight.T, targets)`` without the logits.

With label smoothing ``eps`` the per-token loss is
``-(1 - eps) * log p_t - eps * mean_j log p_j``, the same as ``torch.nn.functional.cross_entropy``;
``mean_j log p_j`` comes from the same fused pass (its flag adds one running sum per token).
"""

from __future__ import annotations

from .linear_logprobs import fused_linear_stats

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, in fp32.

    ``reduction``: "mean" over non-ignored tokens (0 when every token is ignored, where
    PyTorch would give NaN), "sum", or "none" (a ``(T,)`` loss, 0 at ignored tokens).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    smoothing = label_smoothing > 0.0
    logp, _, mean_logp = fused_linear_stats(hidden, weight, targets, 1.0, ignore_index, with_mean_logp=smoothing)
    loss = -logp if not smoothing else -(1.0 - label_smoothing) * logp - label_smoothing * mean_logp
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum().clamp(min=1)
