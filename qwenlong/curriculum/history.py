"""Per-example reward history, recorded during RL and stored in checkpoints.

Difficulty-aware retrospective sampling (``retrospective.py``) needs, for every example seen
so far, how its rollouts fared. We keep running totals rather than raw reward lists, so the
history stays small for long runs and serialises to plain JSON.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

ACCURATE_REWARD = 1.0  # a rollout is accurate when its reward is 1.0 (method.md section 3)
_FORMAT_VERSION = 1


@dataclass
class ExampleRecord:
    """Running totals of one example's rollouts."""

    rollouts: int = 0
    reward_sum: float = 0.0
    accurate: int = 0
    min_response_tokens: int | None = None
    last_phase: str | None = None

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.rollouts if self.rollouts else 0.0

    @property
    def difficulty(self) -> float:
        """1 - mean reward: low reward, high difficulty."""
        return 1.0 - self.mean_reward

    @property
    def all_solved(self) -> bool:
        return self.rollouts > 0 and self.accurate == self.rollouts


class RewardHistory:
    """Rewards of every example's rollouts, keyed by a string example id."""

    def __init__(self) -> None:
        self._records: dict[str, ExampleRecord] = {}

    def record(
        self,
        example_id: str,
        rewards: Sequence[float],
        response_tokens: Sequence[int] | None = None,
        phase: str | None = None,
    ) -> None:
        """Add the rewards (task reward, before any overlong penalty) of one example's rollouts.

        Args:
            example_id: stable id of the example (a string, so it survives JSON).
            rewards: one reward per rollout.
            response_tokens: optional length of each rollout's response.
            phase: name of the phase the rollouts were generated in.
        """
        if not isinstance(example_id, str):
            raise ValueError(f"example_id: expected a string id, got {type(example_id).__name__}")
        if response_tokens is not None and len(response_tokens) != len(rewards):
            raise ValueError(f"response_tokens: expected {len(rewards)} lengths, got {len(response_tokens)}")
        entry = self._records.setdefault(example_id, ExampleRecord())
        entry.rollouts += len(rewards)
        entry.reward_sum += float(sum(rewards))
        entry.accurate += sum(1 for r in rewards if abs(float(r) - ACCURATE_REWARD) <= 1e-6)
        if response_tokens:
            shortest = min(int(n) for n in response_tokens)
            if entry.min_response_tokens is not None:
                shortest = min(shortest, entry.min_response_tokens)
            entry.min_response_tokens = shortest
        if phase is not None:
            entry.last_phase = phase

    def __getitem__(self, example_id: str) -> ExampleRecord:
        return self._records[example_id]

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def to_json(self) -> dict:
        """A JSON-serialisable snapshot (for checkpoints)."""
        return {"version": _FORMAT_VERSION, "examples": {k: asdict(v) for k, v in self._records.items()}}

    @classmethod
    def from_json(cls, data: dict) -> RewardHistory:
        """Inverse of ``to_json``."""
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"data: unsupported reward history version {data.get('version')!r}")
        history = cls()
        history._records = {k: ExampleRecord(**v) for k, v in data["examples"].items()}
        return history
