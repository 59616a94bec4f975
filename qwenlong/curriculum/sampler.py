"""Which prompts an RL step generates for: without replacement, epoch by epoch, optionally task-balanced.

A phase walks a shuffled order of its prompts like a data loader: each prompt is drawn once per
epoch, the order of epoch ``e`` is a fixed function of ``(key, e)``, and the cursor is part of the
checkpoint, so a resumed run draws the prompts the uninterrupted one would. One step never holds
the same prompt twice, even across dynamic-sampling rounds (``exclude``): a prompt the walk reaches
while it is excluded (a draw that crosses into the next epoch, or a later round of the step) is owed
and given first by the next draw that may take it, so no epoch loses it.

Task-balanced (QwenLong-L1.5): every draw holds an equal number of prompts of each task (the
example's ``data_source``); each task walks its own shuffled order, refilled when exhausted, so a
small task repeats sooner than a large one; the assembled draw is shuffled. A task with fewer
prompts than its share (outside ``exclude``) gives all it has and the rest of its share goes to the
other tasks, evenly: the draw keeps its size and still never holds a prompt twice.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence
from typing import Any


class _Stream:
    """An endless walk over ``range(size)``: epoch ``e`` visits a permutation seeded by ``(key, e)``."""

    def __init__(self, size: int, key: str):
        self.size, self.key = size, key
        self.epoch, self.position = 0, 0
        self.owed: list[int] = []  # reached while in ``skip``: given before the walk moves on
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        random.Random(f"{self.key}:epoch{epoch}").shuffle(order)
        return order

    def next(self, skip) -> int | None:
        """The next index not in ``skip``: an owed one first, else the walk's; None when every index is in
        ``skip`` (nothing left to give this step). Indices the walk passes in ``skip`` become owed (consuming
        them would leave them out of their epoch)."""
        for k, index in enumerate(self.owed):
            if index not in skip:
                del self.owed[k]
                return index
        # the rest of this epoch and a whole next one: every index comes up at least once
        for _ in range(2 * self.size):
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            index = self._order[self.position]
            self.position += 1
            if index not in skip:
                return index
            if index not in self.owed:  # owed twice only when skipped a whole epoch: once is enough
                self.owed.append(index)
        return None

    def state(self) -> list:
        return [self.epoch, self.position, list(self.owed)]

    def load(self, state: Sequence) -> None:
        self.epoch, self.position = int(state[0]), int(state[1])
        self.owed = [int(i) for i in state[2]] if len(state) > 2 else []  # older checkpoints: nothing owed
        self._order = self._permutation(self.epoch)


class PromptSampler:
    """Draws prompt indices for one phase (see the module docstring).

    Args:
        tasks: the task of each prompt (its ``data_source``); only read when ``balanced``.
        key: seeds the orders; give it the run seed and the phase name.
        balanced: equal numbers of prompts per task in every draw.
    """

    def __init__(self, tasks: Sequence[Hashable], key: str, balanced: bool = False):
        if not tasks:
            raise ValueError("tasks: a phase needs at least one prompt")
        self.balanced, self.key = balanced, key
        if balanced:
            names = sorted({str(t) for t in tasks})
            self._members = {name: [i for i, t in enumerate(tasks) if str(t) == name] for name in names}
        else:
            self._members = {"all": list(range(len(tasks)))}
        self._streams = {name: _Stream(len(members), f"{key}:{name}") for name, members in self._members.items()}
        self.draws = 0

    @property
    def tasks(self) -> list[str]:
        return list(self._members)

    def _quotas(self, count: int, available: dict[str, int], rng: random.Random) -> dict[str, int]:
        """Equal shares of ``count`` (the remainder to tasks chosen at random per draw), none above what a
        task has ``available``; what a task cannot give is shared again among the others."""
        quotas = dict.fromkeys(self._members, 0)
        left = min(count, sum(available.values()))
        open_tasks = [name for name in self._members if available[name] > 0]
        while left:  # each pass fills the request or caps at least one more task
            base, extra = divmod(left, len(open_tasks))
            lucky = set(rng.sample(open_tasks, extra))
            for name in open_tasks:
                give = min(base + (name in lucky), available[name] - quotas[name])
                quotas[name] += give
                left -= give
            open_tasks = [name for name in open_tasks if quotas[name] < available[name]]
        return quotas

    def draw(self, count: int, exclude: set[int] = frozenset()) -> list[int]:
        """Up to ``count`` prompt indices, none in ``exclude`` and none twice; fewer only when the phase
        has fewer than ``count`` prompts outside ``exclude``."""
        if count < 0:
            raise ValueError(f"count: expected >= 0, got {count}")
        rng = random.Random(f"{self.key}:draw{self.draws}")
        self.draws += 1
        drawn: list[int] = []
        taken = set(exclude)
        members_of = self._members
        local_skips = {name: {j for j, i in enumerate(members) if i in taken} for name, members in members_of.items()}
        available = {name: len(members) - len(local_skips[name]) for name, members in members_of.items()}
        for name, quota in self._quotas(count, available, rng).items():
            members, stream, local_skip = self._members[name], self._streams[name], local_skips[name]
            for _ in range(quota):
                j = stream.next(local_skip)
                if j is None:
                    break
                local_skip.add(j)
                taken.add(members[j])
                drawn.append(members[j])
        if self.balanced:
            rng.shuffle(drawn)
        return drawn

    def state_dict(self) -> dict[str, Any]:
        """JSON-able cursor of every task's walk (for the checkpoint)."""
        return {"draws": self.draws, "streams": {name: s.state() for name, s in self._streams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["streams"]) != set(self._streams):
            raise ValueError(f"state: tasks {sorted(state['streams'])} differ from this phase's {self.tasks}")
        self.draws = int(state["draws"])
        for name, cursor in state["streams"].items():
            self._streams[name].load(cursor)
