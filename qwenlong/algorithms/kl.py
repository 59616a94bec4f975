"""Per-token estimators of KL(pi || pi_ref) from the log-probs of tokens sampled from pi.

With d = logp_ref - logp (both for the sampled token):

- k1 = -d                    unbiased, high variance, can be negative
- k2 = d^2 / 2               biased, low variance, non-negative
- k3 = exp(d) - d - 1        unbiased, low variance, non-negative (the one used as a loss term)

See J. Schulman, "Approximating KL divergence" (2020).
"""

from __future__ import annotations

import torch

from qwenlong.kernels.logprobs.policy_math import k3_kl

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Token-wise KL estimate; ``logp`` and ``ref_logp`` are same-shape log-probs of the sampled tokens."""
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp: shape {tuple(ref_logp.shape)} differs from logp {tuple(logp.shape)}")
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return k3_kl(logp, ref_logp)  # the loss term of grpo_loss, one definition for both
    raise ValueError(f"estimator: expected one of {KL_ESTIMATORS}, got {estimator!r}")
