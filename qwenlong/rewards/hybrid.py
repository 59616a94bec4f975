"""The hybrid reward (method.md section 3): max(rule score, judge score).

The judge is asked only when the rule score is below 1 and an answer was extracted (a
response without ``</think>`` or without "the answer is" has nothing to judge), and never
for multiple-choice letters, which the rule decides exactly (as in the public release), nor
for answers the rules refused outright (too long, a list of candidates, "yes" and "no").
With several gold answers, the judge compares against the first.

Scoring never raises because of a response: a response whose scoring fails scores 0, and when
the judge fails the rule score stands; both are counted (:meth:`HybridReward.counters`, names in
``qwenlong.rewards.stats``). Data errors do raise ``ValueError``: an unknown data source, a bad
gold answer, or, with a judge, an item without a question (the judge would compare answers to
nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.data.sources import rule_kind
from qwenlong.rewards.extract import gold_answer
from qwenlong.rewards.judge.base import Judge, JudgeRequest
from qwenlong.rewards.rules import RuleConfig, RuleResult, gold_list, rule_config, rule_score
from qwenlong.rewards.stats import ALWAYS_LOGGED, ScoringStats


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
    return str(gold_list(ground_truth)[0])


class HybridReward:
    """Rules, plus the judge when one is given (``judge=None``: rules alone)."""

    def __init__(self, judge: Judge | None = None, rule_config: RuleConfig = RuleConfig()):
        self.judge = judge
        self.rule_config = rule_config
        self.stats = ScoringStats()

    def _rules(self, items: Sequence[RewardItem]) -> list[RuleResult]:
        if self.judge is not None:
            for i, item in enumerate(items):
                if not str(item.question).strip():
                    raise ValueError(f"question: item {i} (data_source {item.data_source!r}, ground truth "
                                     f"{str(item.ground_truth)[:80]!r}) has no question; the judge needs one")
        results = [rule_score(rule_kind(it.data_source), it.response, it.ground_truth, self.rule_config)
                   for it in items]
        self.stats.add("score/items", count=len(results))
        for result in results:
            if result.failure is not None:
                self.stats.add("score/failures", f"score/failures/{result.failure}")
            if result.rejected is not None:
                self.stats.add("score/rejected", f"score/rejected/{result.rejected}")
        return results

    def _to_judge(self, items: Sequence[RewardItem], rules: list[RuleResult]) -> dict[int, JudgeRequest]:
        if self.judge is None:
            return {}
        return {i: JudgeRequest(it.question, gold_answer(_first_gold(it.ground_truth)), rule.prediction)
                for i, (it, rule) in enumerate(zip(items, rules, strict=True)) if rule.judgeable}

    def _combine(self, rules: list[RuleResult], requests: dict[int, JudgeRequest],
                 verdicts: list[bool | None]) -> list[RewardResult]:
        by_item = dict(zip(requests, verdicts, strict=True))
        self.stats.add("judge/fallbacks", count=sum(v is None for v in verdicts))
        results = []
        for i, rule in enumerate(rules):
            verdict = by_item.get(i)
            judge_score = None if verdict is None else float(verdict)
            results.append(RewardResult(max(rule.score, judge_score or 0.0), rule.score, judge_score, rule.prediction))
        return results

    async def ascore(self, items: Sequence[RewardItem]) -> list[RewardResult]:
        rules = self._rules(items)
        requests = self._to_judge(items, rules)
        verdicts = await self.judge.verdicts(list(requests.values())) if requests else []
        return self._combine(rules, requests, verdicts)

    def score(self, items: Sequence[RewardItem]) -> list[RewardResult]:
        """:meth:`ascore` from synchronous code (no event loop when nothing needs judging)."""
        rules = self._rules(items)
        requests = self._to_judge(items, rules)
        verdicts = self.judge.verdicts_sync(list(requests.values())) if requests else []
        return self._combine(rules, requests, verdicts)

    def score_one(self, data_source: str, response: str, ground_truth: Any, question: str = "") -> RewardResult:
        return self.score([RewardItem(data_source, response, ground_truth, question)])[0]

    def metrics(self) -> dict[str, int]:
        """Judge counters (requests, cache_hits, calls, yes, no, failures, failures/<reason>)."""
        return self.judge.snapshot() if self.judge is not None else {}

    def counters(self) -> dict[str, int]:
        """Every counter so far: the rules' (``score/...``), the judge's (``judge/...``) and the fallbacks.
        Monotonic: a step's share is the difference of two calls (``stats.counter_delta``)."""
        return {**dict.fromkeys(ALWAYS_LOGGED, 0), **self.stats.snapshot(),
                **{f"judge/{k}": v for k, v in self.metrics().items()}}


def make_reward(judge: dict[str, Any] | Judge | None = None, rules: str = "default") -> HybridReward:
    """A hybrid reward from a judge config (``make_judge``'s dict, a Judge, or None: rules alone) and a
    rule set name (``rule_config``: ``release`` or ``default``), e.g. for a separate evaluation judge."""
    from qwenlong.rewards.judge import make_judge

    if isinstance(judge, dict):
        judge = make_judge(judge)
    return HybridReward(judge, rule_config(rules))
