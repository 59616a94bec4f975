"""Fused LM-head ops: log-probs, entropy, cross-entropy and the GRPO loss without T x V logits."""

from .cross_entropy import linear_cross_entropy
from .grpo import grpo_loss
from .linear_logprobs import fused_linear_loss, linear_logprobs
from .reference import reference_grpo_loss, reference_linear_cross_entropy, reference_linear_logprobs

__all__ = [
    "fused_linear_loss",
    "grpo_loss",
    "linear_cross_entropy",
    "linear_logprobs",
    "reference_grpo_loss",
    "reference_linear_cross_entropy",
    "reference_linear_logprobs",
]
