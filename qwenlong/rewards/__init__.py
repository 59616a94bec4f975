"""Rewards: rule-based verification, the LLM judge, and the hybrid max(rule, judge).

``compute_score`` (verl) and ``trl_reward`` (TRL) are the drop-in reward functions."""

from qwenlong.rewards.adapters import compute_score, default_reward, set_default_reward, trl_reward
from qwenlong.rewards.hybrid import HybridReward, RewardItem, RewardResult
from qwenlong.rewards.rules import DATA_SOURCE_RULES, RuleConfig, RuleKind, RuleResult, rule_kind, rule_score

__all__ = ["DATA_SOURCE_RULES", "HybridReward", "RewardItem", "RewardResult", "RuleConfig", "RuleKind",
           "RuleResult", "compute_score", "default_reward", "rule_kind", "rule_score", "set_default_reward",
           "trl_reward"]
