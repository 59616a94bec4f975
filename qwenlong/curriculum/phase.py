"""Phases of the curriculum: RL runs with growing input (and output) token budgets.

Phase k trains on the examples whose prompt is within its input range, lets responses grow to
its output budget, and starts from phase k-1's policy (method.md section 1.2). By default the
range starts just past phase k-1's input budget, so each phase reads longer documents and earlier
examples return only through retrospective sampling; a phase that sets ``min_input_tokens`` reads
from there up (QwenLong-L1.5's last full-context phase, after the memory-agent merge, sets 0: it
re-reads every prompt up to its budget).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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
        data: the ``data_source`` names of the run's training examples this phase reads (the files
            are the run's ``data.train_files``); empty: all of them, filtered to the phase's input range.
        min_input_tokens: prompts shorter than this are left out of the phase's own data; None
            (the default): one more than the previous phase's ``max_input_tokens`` (0 for the first
            phase), so the phase reads only the prompts no earlier phase could (``input_floors``).
    """

    name: str
    max_input_tokens: int
    max_output_tokens: int
    steps: int | None = None
    epochs: float | None = None
    data: list[str] = field(default_factory=list)
    min_input_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: a phase needs a non-empty name")
        for attr in ("max_input_tokens", "max_output_tokens"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr}: expected a positive token count, got {getattr(self, attr)}")
        if self.min_input_tokens is not None and not 0 <= self.min_input_tokens <= self.max_input_tokens:
            raise ValueError(f"min_input_tokens: expected 0 <= min_input_tokens <= max_input_tokens="
                             f"{self.max_input_tokens} (or null: past the previous phase's budget), "
                             f"got {self.min_input_tokens}")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"steps: set exactly one of steps and epochs (steps={self.steps}, epochs={self.epochs})")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: expected >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs: expected > 0, got {self.epochs}")

    def fits(self, prompt_tokens: int) -> bool:
        """Whether a prompt of this many tokens is within the phase's input budget."""
        return prompt_tokens <= self.max_input_tokens


def input_floors(phases: Sequence[Phase]) -> list[int]:
    """Each phase's shortest prompt (tokens) of its own data: its ``min_input_tokens``, else one more than
    the previous phase's ``max_input_tokens`` (0 for the first phase)."""
    floors, previous_budget = [], -1
    for phase in phases:
        floors.append(phase.min_input_tokens if phase.min_input_tokens is not None else previous_budget + 1)
        previous_budget = phase.max_input_tokens
    return floors


def examples_for_phase(
    examples: Iterable[Example], phase: Phase, prompt_tokens: Callable[[Example], int], min_tokens: int = 0
) -> list[Example]:
    """The examples whose prompt has ``min_tokens`` tokens or more and fits ``phase``, in their original order
    (``input_floors`` gives a phase's ``min_tokens`` in its curriculum)."""
    return [example for example in examples if min_tokens <= prompt_tokens(example) and phase.fits(
        prompt_tokens(example))]
