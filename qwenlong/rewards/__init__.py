"""Rewards: rule-based verification, the LLM judge, and the hybrid max(rule, judge).

``compute_score`` (verl) and ``trl_reward`` (TRL) are the drop-in reward functions."""

from qwenlong.data.sources import DATA_SOURCE_RULES, RuleKind, rule_kind
from qwenlong.rewards.adapters import compute_score, default_reward, set_default_reward, trl_reward
from qwenlong.rewards.hybrid import HybridReward, RewardItem, RewardResult, make_reward
from qwenlong.rewards.rules import RuleConfig, RuleResult, check_record_answers, rule_config, rule_score
from qwenlong.rewards.stats import ScoringFailure, ScoringStats, counter_delta

__all__ = ["DATA_SOURCE_RULES", "HybridReward", "RewardItem", "RewardResult", "RuleConfig", "RuleKind",
           "RuleResult", "ScoringFailure", "ScoringStats", "check_record_answers", "compute_score", "counter_delta",
           "default_reward", "make_reward", "rule_config", "rule_kind", "rule_score", "set_default_reward",
           "trl_reward"]
