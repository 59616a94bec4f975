"""Rule-based verification: route by data source (``qwenlong.data.sources``) to the free-form, numeric
or choice rule.

A bad gold answer or data source is a data error and raises ``ValueError``. A response never
raises: whatever it holds, it is scored in time linear in its length, and a response that
cannot be scored (a 5,000-digit number, ...) scores 0 with ``RuleResult.failure`` saying why.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qwenlong.data.records import DocQARecord
from qwenlong.data.sources import RuleKind, rule_kind
from qwenlong.rewards.extract import extract_answer, extract_choice, final_segment, gold_answer
from qwenlong.rewards.normalize import contains_words, normalize_answer
from qwenlong.rewards.numeric import numbers_match, parse_number
from qwenlong.rewards.stats import ScoringFailure


@dataclass(frozen=True)
class RuleConfig:
    """Rule options. The defaults are the method's rules plus guards against false negatives and
    cheap wins; :meth:`faithful` turns every guard off to reproduce the release exactly.

    require_think: a response without ``</think>`` scores 0 (set False for non-reasoning models).
    max_answer_chars: a longer extracted answer scores 0 and is never judged (None: no cap).
    unicode_punctuation: normalization strips all Unicode punctuation, not only ASCII's.
    max_length_ratio, length_slack: free-form containment on word boundaries (a plural or possessive
        "s" on the gold's last word allowed), and at most ``ratio * gold words + slack`` words, else
        the answer is too long (scores 0, never judged). None: the release's character containment.
    refuse_yes_and_no: an answer that answers both "yes" and "no" (a clause opening with each, as in "yes
        and no"; "yes, there is no doubt" answers "yes"), and a gold that does not, scores 0.
    min_part_ratio: an answer that is a strict part of a longer gold must hold this fraction of the
        gold's content words (words not in ``STOPWORDS``), and at least one ("of" for "University
        of Oxford" scores 0; "Obama" for "Barack Obama" scores 1). None: any part scores.
    max_list_items: an answer listing more items (split on commas, semicolons, "or", "and") than
        this and than the gold scores 0 and is never judged. None: no limit.
    """

    require_think: bool = True
    max_answer_chars: int | None = 1000
    unicode_punctuation: bool = True
    max_length_ratio: float | None = 3.0
    length_slack: int = 5
    refuse_yes_and_no: bool = True
    min_part_ratio: float | None = 0.5
    max_list_items: int | None = 2

    def __post_init__(self) -> None:
        if self.max_answer_chars is not None and self.max_answer_chars < 1:
            raise ValueError(f"max_answer_chars: must be >= 1 or None, got {self.max_answer_chars}")
        if self.max_length_ratio is not None and not self.max_length_ratio > 0:
            raise ValueError(f"max_length_ratio: must be > 0 or None, got {self.max_length_ratio}")
        if self.min_part_ratio is not None and not 0 < self.min_part_ratio <= 1:
            raise ValueError(f"min_part_ratio: must be in (0, 1] or None, got {self.min_part_ratio}")
        if self.max_list_items is not None and self.max_list_items < 1:
            raise ValueError(f"max_list_items: must be >= 1 or None, got {self.max_list_items}")

    @classmethod
    def faithful(cls) -> RuleConfig:
        """The public release's rules, exactly: no guard, ASCII punctuation only, no length cap (the
        rules stay linear in the answer's length; the judge has its own cap)."""
        return cls(max_answer_chars=None, unicode_punctuation=False, max_length_ratio=None,
                   refuse_yes_and_no=False, min_part_ratio=None, max_list_items=None)


RULE_CONFIGS = {"release": RuleConfig.faithful, "default": RuleConfig}


def rule_config(name: str) -> RuleConfig:
    """``release`` (the public release's exact rules, for numbers comparable with the paper) or
    ``default`` (the release's rules plus the guards), as ``eval.rules`` names them."""
    if name not in RULE_CONFIGS:
        raise ValueError(f"rules: expected one of {sorted(RULE_CONFIGS)}, got {name!r}")
    return RULE_CONFIGS[name]()


@dataclass(frozen=True)
class RuleResult:
    """The rule score and the extracted answer (what the judge is shown; None: nothing to judge).

    ``rejected``: why the rules refused the answer outright (``too_long``, ``list``,
    ``yes_and_no``); such an answer is never shown to the judge. ``failure``: why scoring the
    response failed (it then scores 0)."""

    score: float
    prediction: str | None
    kind: RuleKind
    rejected: str | None = None
    failure: str | None = None

    @property
    def judgeable(self) -> bool:
        return (self.score < 1.0 and bool(self.prediction) and self.rejected is None and self.failure is None
                and self.kind is not RuleKind.CHOICE)


STOPWORDS = frozenset(
    "of in on at to for by with from and or as is was are were be been it its this that these those "
    "not into onto than then there their his her he she they them we you i my our your".split())
_LIST_SEPARATORS = re.compile(r",\s|[;\n、，；]|\s/\s|\s(?:or|and|&)\s", re.IGNORECASE)
_CLAUSE_BREAKS = re.compile(r"[^\w\s]+|\b(?:and|or|but)\b", re.IGNORECASE)


def _list_items(text: str) -> int:
    """Items of an enumeration in ``text``; an article alone ("the or aa or aa") is no item."""
    return sum(1 for item in _LIST_SEPARATORS.split(text) if item.strip().lower() not in ("", "a", "an", "the"))


def _verdict_words(text: str) -> set[str]:
    """The "yes" / "no" an answer states: the run of them opening each clause (clauses split at
    punctuation and "and" / "or" / "but"). "yes and no", "Yes. No." and "yes no" state both; "yes,
    there is no doubt" states "yes" only."""
    said = set()
    for clause in _CLAUSE_BREAKS.split(text.lower()):
        for word in clause.split():
            if word not in ("yes", "no"):
                break
            said.add(word)
    return said


def _choice_letter(gold: str) -> str:
    letter = extract_choice(gold) or gold.strip().strip("().").strip()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"ground_truth: a multiple-choice gold answer must be a letter, got {gold!r}")
    return letter.upper()


def _free_form(prediction: str, gold: str, config: RuleConfig) -> float | str:
    """1.0 / 0.0, or the reason the answer is rejected outright."""
    pred = normalize_answer(prediction, config.unicode_punctuation)
    ref = normalize_answer(gold, config.unicode_punctuation)
    if not pred or not ref:
        return 0.0
    if config.max_length_ratio is None:
        return float(ref in pred or pred in ref)
    pred_words, ref_words = pred.split(), ref.split()
    both = {"yes", "no"}
    if config.refuse_yes_and_no and _verdict_words(prediction) == both and _verdict_words(gold) != both:
        return "yes_and_no"
    if config.max_list_items is not None and _list_items(prediction) > max(config.max_list_items, _list_items(gold)):
        return "list"
    if len(pred_words) > config.max_length_ratio * len(ref_words) + config.length_slack:
        return "too_long"
    if contains_words(pred, ref, suffixes=True):
        return 1.0
    if not contains_words(ref, pred, suffixes=True):
        return 0.0
    if config.min_part_ratio is not None and pred != ref:
        content = [w for w in pred_words if w not in STOPWORDS]
        gold_content = [w for w in ref_words if w not in STOPWORDS] or ref_words
        if not content or len(content) < config.min_part_ratio * len(gold_content):
            return 0.0
    return 1.0


def gold_list(ground_truth: Any) -> list:
    """The gold answer(s) as a list: one answer (text or a number, numpy's included) or a sequence or
    numpy array of them; anything else is a ValueError."""
    if hasattr(ground_truth, "tolist") and not isinstance(ground_truth, str):  # a numpy scalar or array
        ground_truth = ground_truth.tolist()
    if isinstance(ground_truth, (str, int, float)):
        return [ground_truth]
    try:
        return list(ground_truth)
    except TypeError:
        raise ValueError(f"ground_truth: expected text, a number or a list of them, got "
                         f"{type(ground_truth).__name__}") from None


def _golds(kind: RuleKind, ground_truth: str | float | Sequence[str | float]) -> list:
    """The gold answers, checked and parsed once: letters, numbers (or text), or text."""
    golds = gold_list(ground_truth)
    if not golds:
        raise ValueError("ground_truth: empty")
    if kind is RuleKind.CHOICE:
        return [_choice_letter(str(g)) for g in golds]
    texts = [gold_answer(str(g)) for g in golds]
    if kind is RuleKind.FREE_FORM:
        return texts
    parsed = []
    for text in texts:
        try:
            parsed.append((text, parse_number(text)))
        except ScoringFailure as e:
            raise ValueError(f"ground_truth: {e} in {text[:80]!r}") from None
    return parsed


def check_record_answers(record: DocQARecord) -> None:
    """A ValueError (``answer: ...``) when the record's rule cannot read its gold answers (it would raise at the
    first score, mid-run), or, for a multiple-choice record, when a gold letter names none of its options (no
    response could ever score): what training data loads with (``load_records(check=...)``)."""
    kind = rule_kind(record.data_source)
    if kind is RuleKind.SIMILARITY:  # MRCR: scored by evaluation against its prefix, not by a rule
        return
    try:
        golds = _golds(kind, record.answers)
    except ValueError as e:
        raise ValueError(f"answer: {str(e).removeprefix('ground_truth: ')}") from None
    if kind is RuleKind.CHOICE and record.choices:
        last = chr(ord("A") + len(record.choices) - 1)
        for letter in golds:
            if not "A" <= letter <= last:
                raise ValueError(f"answer: {letter!r} names none of the {len(record.choices)} options (A-{last})")


def _score(kind: RuleKind, segment: str, golds: list, config: RuleConfig) -> RuleResult:
    if kind is RuleKind.CHOICE:
        letter = extract_choice(segment)
        return RuleResult(float(letter is not None and letter in golds), letter, kind)
    prediction = extract_answer(segment)
    if not prediction:
        return RuleResult(0.0, None, kind)
    if config.max_answer_chars is not None and len(prediction) > config.max_answer_chars:
        return RuleResult(0.0, prediction, kind, rejected="too_long")
    numeric = kind is RuleKind.NUMERIC and any(value is not None for _, value in golds)
    pred_value = parse_number(prediction) if numeric else None
    outcomes = []
    for gold in golds:
        if kind is RuleKind.NUMERIC and gold[1] is not None:
            outcomes.append(float(pred_value is not None and numbers_match(pred_value, gold[1])))
        else:  # free form, or a non-numeric gold in a numeric set: compare as text
            outcomes.append(_free_form(prediction, gold if kind is RuleKind.FREE_FORM else gold[0], config))
    if 1.0 in outcomes:
        return RuleResult(1.0, prediction, kind)
    rejected = next((o for o in outcomes if isinstance(o, str)), None)
    return RuleResult(0.0, prediction, kind, rejected=rejected)


def rule_score(kind: RuleKind, response: str, ground_truth: str | float | Sequence[str | float],
               config: RuleConfig = RuleConfig()) -> RuleResult:
    """Score one response against one or several gold answers (the best counts)."""
    if kind is RuleKind.SIMILARITY:
        raise ValueError("data_source: MRCR items are scored against their record's random prefix "
                         "(qwenlong.eval.scoring), not by a reward rule")
    golds = _golds(kind, ground_truth)
    try:
        segment = final_segment(response, config.require_think)
        if segment is None:
            return RuleResult(0.0, None, kind)
        return _score(kind, segment, golds, config)
    except ScoringFailure as e:
        return RuleResult(0.0, None, kind, failure=e.reason)
    except Exception as e:  # noqa: BLE001 - a response must never stop training; counted by type
        return RuleResult(0.0, None, kind, failure=f"error/{type(e).__name__}")

