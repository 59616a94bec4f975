"""What went wrong while scoring, counted: the reward layer never raises on a response, so each
failure scores 0 (or falls back to the rule score) and is counted here instead.

:class:`ScoringStats` holds monotonically increasing counters (thread-safe). The trainer reads
:meth:`ScoringStats.snapshot` before and after a step and logs the difference
(:func:`counter_delta`) in ``metrics.jsonl``. Counter names:

* ``score/items``: responses scored; ``score/failures`` and ``score/failures/<reason>``: responses
  whose scoring failed (``number_too_long``, ``error/<ExceptionType>``, ...) and scored 0;
  ``score/rejected`` and ``score/rejected/<reason>``: answers the rules refused outright (``too_long``,
  ``list``, ``yes_and_no``: scored 0, never judged);
* ``judge/requests``, ``judge/cache_hits``, ``judge/calls`` (requests sent), ``judge/yes``, ``judge/no``,
  ``judge/failures`` and ``judge/failures/<reason>`` (``timeout``, ``connection``, ``http_503``,
  ``unparseable``, ``deadline``, ``circuit_open``, ``too_long``, ...);
  ``judge/fallbacks``: judged responses whose judge failed, so the rule score stands.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping

# Logged every step, zero or not, so every metrics row has them.
ALWAYS_LOGGED = ("score/items", "score/failures", "score/rejected", "judge/calls", "judge/failures",
                 "judge/fallbacks")


class ScoringFailure(Exception):
    """Scoring a response failed for a reason the response caused; ``reason`` is counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ScoringStats:
    """Thread-safe counters (see the module docstring)."""

    def __init__(self):
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, *keys: str, count: int = 1) -> None:
        with self._lock:
            for key in keys:
                self._counts[key] += count

    def __getitem__(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def counter_delta(before: Mapping[str, int], after: Mapping[str, int],
                  always: Iterable[str] = ALWAYS_LOGGED) -> dict[str, int]:
    """``after - before`` for every counter that moved, plus ``always`` (zero when they did not)."""
    delta = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    return {**dict.fromkeys(always, 0), **delta}
