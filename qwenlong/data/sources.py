"""Which answer type each data source has: the rule that checks its answers.

``data_source`` accepts the public release's names (docmath, multihoprag, musique,
long_toc_choices), the benchmark names (frames, 2wikimqa, hotpotqa, narrativeqa, qasper)
and the synthetic generator's. Like the release, a name that *contains* a known name
(``docmath_simplong``) routes to it; anything else is a ValueError. Loading data checks it here,
and the rewards (``qwenlong.rewards.rules``) route by it.
"""

from __future__ import annotations

from enum import Enum


class RuleKind(str, Enum):
    FREE_FORM = "free_form"
    NUMERIC = "numeric"
    CHOICE = "multiple_choice"
    SIMILARITY = "similarity"  # MRCR: scored in evaluation only, by qwenlong.eval.scoring


DATA_SOURCE_RULES: dict[str, RuleKind] = {
    "docmath": RuleKind.NUMERIC,
    "long_toc_choices": RuleKind.CHOICE,
    "longbench_v2": RuleKind.CHOICE,
    "mrcr": RuleKind.SIMILARITY,
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
