"""RL math for GRPO / DAPO as small pure functions (method.md section 2).

The trainers only wire these together; the per-token policy loss itself is the fused
``qwenlong.kernels.grpo_loss``, and its per-token terms and loss reduction (``aggregate_tokens``,
``loss_normalizer``) live with it in ``qwenlong.kernels.logprobs.policy_math``, the one place the
kernels, the trainer and every framework integration take them from.
"""

from qwenlong.algorithms.advantages import (
    broadcast_to_tokens,
    group_advantages,
    segment_sum,
    task_normalized_advantages,
)
from qwenlong.algorithms.dynamic_sampling import GroupCollector, informative_groups
from qwenlong.algorithms.kl import KL_ESTIMATORS, kl_estimate
from qwenlong.algorithms.metrics import group_accuracy_metrics, is_accurate, pass_at_k
from qwenlong.algorithms.overlong import overlong_penalty

__all__ = [
    "KL_ESTIMATORS",
    "GroupCollector",
    "broadcast_to_tokens",
    "group_accuracy_metrics",
    "group_advantages",
    "informative_groups",
    "is_accurate",
    "kl_estimate",
    "overlong_penalty",
    "pass_at_k",
    "segment_sum",
    "task_normalized_advantages",
]
