"""Phases of the curriculum: RL runs with growing input (and output) token budgets.

Phase k trains only on examples whose prompt fits its input budget, lets responses grow to
its output budget, and starts from phase k-1's policy (method.md section 1.2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

Example = TypeVar("Example")


@dataclass
class Phase:
    """One curriculum phase.

    Attributes:
        name: label used in logs, checkpoints and the report (e.g. ``"20k"``).
        max_input_tokens: prompts longer than this are left out of the phase.
        max_output_tokens: response limit while generating in this phase.
        steps: number of RL steps; exactly one of ``steps`` and ``epochs`` is set.
        epochs: passes over the phase's data.
        data: data sources of this phase (files or dataset names); empty means the run's
            training data, filtered to the phase's input budget.
    """

    name: str
    max_input_tokens: int
    max_output_tokens: int
    steps: int | None = None
    epochs: float | None = None
    data: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: a phase needs a non-empty name")
        for attr in ("max_input_tokens", "max_output_tokens"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr}: expected a positive token count, got {getattr(self, attr)}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"steps: set exactly one of steps and epochs (steps={self.steps}, epochs={self.epochs})")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs: expected > 0, got {self.epochs}")

    def fits(self, prompt_tokens: int) -> bool:
        """Whether a prompt of this many tokens is within the phase's input budget."""
        return prompt_tokens <= self.max_input_tokens


def examples_for_phase(
    examples: Iterable[Example], phase: Phase, prompt_tokens: Callable[[Example], int]
) -> list[Example]:
    """The examples whose prompt fits ``phase``, in their original order."""
    return [example for example in examples if phase.fits(prompt_tokens(example))]
