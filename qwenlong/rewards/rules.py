"""Rule-based verification: route by data source to the free-form, numeric or choice rule.

``data_source`` accepts the public release's names (docmath, multihoprag, musique,
long_toc_choices), the benchmark names (frames, 2wikimqa, hotpotqa, narrativeqa, qasper)
and the synthetic generator's. Like the release, a name that *contains* a known name
(``docmath_simplong``) routes to it; anything else is a ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from qwenlong.rewards.extract import extract_answer, extract_choice, final_segment, gold_answer
from qwenlong.rewards.normalize import sub_exact_match
from qwenlong.rewards.numeric import numbers_match, parse_number


class RuleKind(str, Enum):
    FREE_FORM = "free_form"
    NUMERIC = "numeric"
    CHOICE = "multiple_choice"


DATA_SOURCE_RULES: dict[str, RuleKind] = {
    "docmath": RuleKind.NUMERIC,
    "long_toc_choices": RuleKind.CHOICE,
    **{name: RuleKind.FREE_FORM for name in (
        "multihoprag", "musique", "frames", "2wikimqa", "2wikimultihopqa", "hotpotqa", "narrativeqa", "qasper")},
    "synthetic_copy": RuleKind.FREE_FORM,
    "synthetic_retrieval": RuleKind.FREE_FORM,
    "synthetic_choice": RuleKind.CHOICE,
    "synthetic_arithmetic": RuleKind.NUMERIC,
}


def rule_kind(data_source: str) -> RuleKind:
    """The rule for a data source name (exact name first, else the longest contained name)."""
    name = str(data_source).strip().lower()
    if name in DATA_SOURCE_RULES:
        return DATA_SOURCE_RULES[name]
    contained = [known for known in DATA_SOURCE_RULES if known in name]
    if not contained:
        raise ValueError(f"data_source: unknown {data_source!r}; expected one of {sorted(DATA_SOURCE_RULES)}")
    return DATA_SOURCE_RULES[max(contained, key=len)]


@dataclass(frozen=True)
class RuleConfig:
    """Rule options. The defaults are the method's rules plus the anti-gaming length guard;
    :meth:`faithful` turns the guard off to reproduce the release exactly.

    require_think: a response without ``</think>`` scores 0 (set False for non-reasoning models).
    max_length_ratio, length_slack: the sub-EM guard (None disables it), see ``sub_exact_match``.
    """

    require_think: bool = True
    max_length_ratio: float | None = 3.0
    length_slack: int = 5

    @classmethod
    def faithful(cls) -> RuleConfig:
        return cls(max_length_ratio=None)


@dataclass(frozen=True)
class RuleResult:
    """The rule score and the extracted answer (what the judge is shown; None: nothing to judge)."""

    score: float
    prediction: str | None
    kind: RuleKind


def _choice_letter(gold: str) -> str:
    letter = extract_choice(gold) or gold.strip().strip("().").strip()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"ground_truth: a multiple-choice gold answer must be a letter, got {gold!r}")
    return letter.upper()


def _free_form(prediction: str, gold: str, config: RuleConfig) -> bool:
    return sub_exact_match(prediction, gold, max_length_ratio=config.max_length_ratio,
                           length_slack=config.length_slack)


def _matches(kind: RuleKind, prediction: str, gold: str, config: RuleConfig) -> bool:
    if kind is RuleKind.NUMERIC:
        gold_value = parse_number(gold)
        if gold_value is None:  # a non-numeric gold in a numeric set: compare as text
            return _free_form(prediction, gold, config)
        pred_value = parse_number(prediction)
        return pred_value is not None and numbers_match(pred_value, gold_value)
    return _free_form(prediction, gold, config)


def rule_score(kind: RuleKind, response: str, ground_truth: str | float | Sequence[str | float],
               config: RuleConfig = RuleConfig()) -> RuleResult:
    """Score one response against one or several gold answers (the best counts)."""
    golds = [ground_truth] if isinstance(ground_truth, (str, int, float)) else list(ground_truth)
    if not golds:
        raise ValueError("ground_truth: empty")
    segment = final_segment(response, config.require_think)
    if segment is None:
        return RuleResult(0.0, None, kind)
    if kind is RuleKind.CHOICE:
        letter = extract_choice(segment)
        correct = letter is not None and any(letter == _choice_letter(str(g)) for g in golds)
        return RuleResult(float(correct), letter, kind)
    prediction = extract_answer(segment)
    if not prediction:
        return RuleResult(0.0, None, kind)
    correct = any(_matches(kind, prediction, gold_answer(str(g)), config) for g in golds)
    return RuleResult(float(correct), prediction, kind)
