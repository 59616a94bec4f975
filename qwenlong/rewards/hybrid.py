"""The hybrid reward (method.md section 3): max(rule score, judge score).

The judge is asked only when the rule score is below 1 and an answer was extracted (a
response without ``</think>`` or without "the answer is" has nothing to judge), and never
for multiple-choice letters, which the rule decides exactly (as in the public release).
With several gold answers, the judge compares against the first.
When the judge fails, the rule score stands and the failure is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.rewards.extract import gold_answer
from qwenlong.rewards.judge.base import Judge, JudgeRequest
from qwenlong.rewards.rules import RuleConfig, RuleKind, RuleResult, rule_kind, rule_score


@dataclass(frozen=True)
class RewardItem:
    """One response to score. ``question`` is what the judge sees (see data.extract_question)."""

    data_source: str
    response: str
    ground_truth: Any
    question: str = ""


@dataclass(frozen=True)
class RewardResult:
    score: float
    rule_score: float
    judge_score: float | None  # None: not asked, or the judge failed
    prediction: str | None

    @property
    def accurate(self) -> bool:
        """The method's accuracy: the reward is 1.0."""
        return self.score == 1.0


def _first_gold(ground_truth: Any) -> str:
    if isinstance(ground_truth, (str, int, float)):
        return str(ground_truth)
    return str(list(ground_truth)[0])


class HybridReward:
    """Rules, plus the judge when one is given (``judge=None``: rules alone)."""

    def __init__(self, judge: Judge | None = None, rule_config: RuleConfig = RuleConfig()):
        self.judge = judge
        self.rule_config = rule_config

    def _rules(self, items: Sequence[RewardItem]) -> list[RuleResult]:
        return [rule_score(rule_kind(it.data_source), it.response, it.ground_truth, self.rule_config) for it in items]

    def _to_judge(self, items: Sequence[RewardItem], rules: list[RuleResult]) -> dict[int, JudgeRequest]:
        if self.judge is None:
            return {}
        return {i: JudgeRequest(it.question, gold_answer(_first_gold(it.ground_truth)), rule.prediction)
                for i, (it, rule) in enumerate(zip(items, rules, strict=True))
                if rule.score < 1.0 and rule.prediction and rule.kind is not RuleKind.CHOICE}

    @staticmethod
    def _combine(rules: list[RuleResult], verdicts: dict[int, bool | None]) -> list[RewardResult]:
        results = []
        for i, rule in enumerate(rules):
            verdict = verdicts.get(i)
            judge_score = None if verdict is None else float(verdict)
            results.append(RewardResult(max(rule.score, judge_score or 0.0), rule.score, judge_score, rule.prediction))
        return results

    async def ascore(self, items: Sequence[RewardItem]) -> list[RewardResult]:
        rules = self._rules(items)
        requests = self._to_judge(items, rules)
        verdicts = await self.judge.verdicts(list(requests.values())) if requests else []
        return self._combine(rules, dict(zip(requests, verdicts, strict=True)))

    def score(self, items: Sequence[RewardItem]) -> list[RewardResult]:
        """:meth:`ascore` from synchronous code (no event loop when nothing needs judging)."""
        rules = self._rules(items)
        requests = self._to_judge(items, rules)
        verdicts = self.judge.verdicts_sync(list(requests.values())) if requests else []
        return self._combine(rules, dict(zip(requests, verdicts, strict=True)))

    def score_one(self, data_source: str, response: str, ground_truth: Any, question: str = "") -> RewardResult:
        return self.score([RewardItem(data_source, response, ground_truth, question)])[0]

    def metrics(self) -> dict[str, int]:
        """Judge counters (requests, cache_hits, calls, yes, no, failures, failures/<reason>)."""
        return dict(self.judge.stats) if self.judge is not None else {}
