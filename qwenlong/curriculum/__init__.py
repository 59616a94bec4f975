"""Phased curriculum and difficulty-aware retrospective sampling (method.md sections 1.2-1.3).

Plain Python: trainers call these at phase boundaries and store the results in checkpoints.
"""

from qwenlong.curriculum.history import ExampleRecord, RewardHistory
from qwenlong.curriculum.phase import Phase, examples_for_phase, input_floors
from qwenlong.curriculum.retrospective import (
    CarryDecision,
    RetrospectiveSampling,
    RetrospectiveSelection,
    max_carried_examples,
    select_retrospective,
)
from qwenlong.curriculum.sampler import PromptSampler

__all__ = [
    "CarryDecision",
    "ExampleRecord",
    "Phase",
    "PromptSampler",
    "RetrospectiveSampling",
    "RetrospectiveSelection",
    "RewardHistory",
    "examples_for_phase",
    "input_floors",
    "max_carried_examples",
    "select_retrospective",
]
