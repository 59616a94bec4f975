"""Difficulty-aware retrospective sampling (method.md section 1.3).

At a phase change, examples from earlier phases are scored by difficulty = 1 - mean reward and
the hard ones are carried into the next phase's data:

1. examples every rollout solved carry no learning signal: dropped;
2. only examples with mean reward below ``max_mean_reward`` (default 0.5) stay eligible;
3. the prompt must fit the next phase's input budget (``max_input_tokens``; its ``min_input_tokens``
   bounds only its own data: carrying brings back earlier, shorter examples), and the example's
   shortest recorded response must fit its output budget (otherwise no rollout could finish);
4. from the eligible ones, draw without replacement with probability proportional to
   difficulty (Efraimidis-Spirakis keys, seeded), until carried examples make up
   ``max_fraction`` (default 0.3) of the next phase's data.

The result says, for every candidate, whether it was carried and why; trainers store it in the
checkpoint and the report.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field

from qwenlong.curriculum.history import ExampleRecord, RewardHistory
from qwenlong.curriculum.phase import Phase


@dataclass
class RetrospectiveSampling:
    """Settings of retrospective sampling.

    Attributes:
        enabled: carry hard examples at phase changes.
        max_mean_reward: examples with mean reward at or above this are not carried.
        max_fraction: carried examples make up at most this share of the next phase's data.
        seed: seed of the weighted draw; None (the default): derived from the run's seed and the phase
            (``select_retrospective``'s ``default_seed``), so runs with different seeds carry different draws.
    """

    enabled: bool = True
    max_mean_reward: float = 0.5
    max_fraction: float = 0.3
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_fraction < 1.0:
            raise ValueError(f"max_fraction: expected a share in [0, 1), got {self.max_fraction}")


@dataclass
class CarryDecision:
    """Why one candidate example was or was not carried into the next phase."""

    example_id: str
    carried: bool
    reason: str
    mean_reward: float | None = None
    difficulty: float | None = None
    rollouts: int = 0


@dataclass
class RetrospectiveSelection:
    """Outcome of one phase change: carried ids (in draw order) and a decision per candidate."""

    next_phase: str
    max_carried: int
    carried: list[str] = field(default_factory=list)
    decisions: list[CarryDecision] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RetrospectiveSelection:
        decisions = [CarryDecision(**d) for d in data["decisions"]]
        return cls(data["next_phase"], data["max_carried"], list(data["carried"]), decisions)

    def reason_counts(self) -> dict[str, int]:
        """How many candidates each kind of reason covers (the text before the first ':')."""
        counts: dict[str, int] = {}
        for decision in self.decisions:
            key = decision.reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts


def max_carried_examples(next_phase_size: int, max_fraction: float) -> int:
    """Largest n with n / (next_phase_size + n) <= max_fraction."""
    return math.floor(max_fraction * next_phase_size / (1.0 - max_fraction) + 1e-9)


def _reason_not_eligible(
    record: ExampleRecord | None, prompt_tokens: int, next_phase: Phase, settings: RetrospectiveSampling
) -> str | None:
    """Why an example cannot be carried (None when it can); the text before ':' is the kind."""
    if record is None or record.rollouts == 0:
        return "no rollouts: nothing recorded for this example"
    if record.all_solved:
        return f"all solved: all {record.rollouts} rollouts were accurate"
    if record.mean_reward >= settings.max_mean_reward:
        return f"easy: mean reward {record.mean_reward:.3f} >= {settings.max_mean_reward}"
    if not next_phase.fits(prompt_tokens):
        return f"input too long: prompt {prompt_tokens} > {next_phase.max_input_tokens} tokens"
    if record.min_response_tokens is not None and record.min_response_tokens > next_phase.max_output_tokens:
        shortest = record.min_response_tokens
        return f"output too long: shortest response {shortest} > {next_phase.max_output_tokens} tokens"
    return None


def select_retrospective(
    history: RewardHistory,
    candidates: Mapping[str, int],
    next_phase: Phase,
    next_phase_size: int,
    settings: RetrospectiveSampling | None = None,
    exclude: Collection[str] = (),
    default_seed: str | int = 0,
) -> RetrospectiveSelection:
    """Choose the earlier examples to carry into ``next_phase``.

    Args:
        history: rewards recorded so far.
        candidates: example id -> prompt length in tokens, for the examples of earlier phases (a phase
            that re-reads them, e.g. ``min_input_tokens: 0``, has them in its own data: pass them in
            ``exclude`` or leave them out).
        next_phase: the phase about to start.
        next_phase_size: number of examples in the next phase's own data.
        settings: thresholds and seed (defaults: mean reward < 0.5, at most 30%).
        exclude: ids already in the next phase's data.
        default_seed: seeds the draw when ``settings.seed`` is None (the pipeline passes the run seed
            and the phase name).
    Returns:
        The carried ids (in draw order) and a ``CarryDecision`` for every candidate, in sorted id order.
    """
    settings = settings or RetrospectiveSampling()
    if next_phase_size < 0:
        raise ValueError(f"next_phase_size: expected >= 0, got {next_phase_size}")
    max_carried = max_carried_examples(next_phase_size, settings.max_fraction) if settings.enabled else 0
    decisions: dict[str, CarryDecision] = {}
    eligible: list[str] = []
    for example_id in sorted(candidates):
        record = history[example_id] if example_id in history else None
        if example_id in exclude:
            reason = "already in next phase: the example is part of the next phase's own data"
        elif not settings.enabled:
            reason = "disabled: retrospective sampling is off"
        else:
            reason = _reason_not_eligible(record, candidates[example_id], next_phase, settings)
        decision = CarryDecision(example_id, False, reason or "")
        if record is not None and record.rollouts:
            decision.mean_reward, decision.difficulty = record.mean_reward, record.difficulty
            decision.rollouts = record.rollouts
        if reason is None:
            eligible.append(example_id)
        decisions[example_id] = decision

    # Efraimidis-Spirakis: the k largest keys u^(1/w) are a weighted draw without replacement.
    rng = random.Random(default_seed if settings.seed is None else settings.seed)
    keys = {i: math.log(1.0 - rng.random()) / max(decisions[i].difficulty, 1e-12) for i in eligible}
    drawn = sorted(eligible, key=keys.__getitem__, reverse=True)
    for rank, example_id in enumerate(drawn):
        decision = decisions[example_id]
        decision.carried = rank < max_carried
        if decision.carried:
            decision.reason = f"carried: difficulty {decision.difficulty:.3f}, drawn {rank + 1} of {max_carried}"
        else:
            decision.reason = f"not drawn: difficulty {decision.difficulty:.3f}, cap of {max_carried} reached"
    return RetrospectiveSelection(next_phase.name, max_carried, drawn[:max_carried], list(decisions.values()))
