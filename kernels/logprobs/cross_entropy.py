"""Fused linear cross-entropy for SFT: ``CE(hidden @ weight.T, targets)`` without the logits.

With label smoothing ``eps`` the per-token loss is
``-(1 - eps) * log p_t - eps * mean_j log p_j``, the same as ``torch.nn.functional.cross_entropy``;
``mean_j log p_j`` comes from the same fused pass (its flag adds one running sum per token).
"""

from __future__ import annotations

from .linear_logprobs import fused_linear_loss, fused_linear_stats

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden, weight, targets, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                         grad_in_forward=False):
    """Cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, in fp32.

    ``reduction``: "mean" over non-ignored tokens (0 when every token is ignored, where
    PyTorch would give NaN), "sum", or "none" (a ``(T,)`` loss, 0 at ignored tokens).
    ``grad_in_forward`` (scalar reductions only): compute the gradients during the forward from the
    logits it already has (6 instead of 8 T_valid d V FLOPs, an fp32 logits chunk of memory;
    see :func:`fused_linear_loss`); ``loss.backward()`` then only scales them.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if grad_in_forward and reduction == "none":
        raise ValueError("grad_in_forward needs a scalar loss: reduction must be 'mean' or 'sum', got 'none'")
    smoothing = label_smoothing > 0.0
    if grad_in_forward:
        scale = 1.0 if reduction == "sum" else 1.0 / (targets != ignore_index).sum().clamp(min=1)

        def token_loss(rows, logp, entropy, mean_logp):
            loss = -logp if not smoothing else -(1.0 - label_smoothing) * logp - label_smoothing * mean_logp
            return loss * scale

        return fused_linear_loss(hidden, weight, targets, token_loss, 1.0, ignore_index,
                                 with_mean_logp=smoothing)[0]
    logp, _, mean_logp = fused_linear_stats(hidden, weight, targets, 1.0, ignore_index, with_mean_logp=smoothing)
    loss = -logp if not smoothing else -(1.0 - label_smoothing) * logp - label_smoothing * mean_logp
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum().clamp(min=1)
