"""Is one stage's held-out accuracy really higher than another's? A paired comparison.

Both stages answer the same items, so only the items whose outcome changed carry evidence:
``improved`` (wrong before, right after) and ``regressed`` (right before, wrong after). With
``m = improved + regressed`` such items and ``n`` items in all,

    gain = (improved - regressed) / n

Under "no change" each changed item is equally likely to have improved or regressed, so
``improved ~ Binomial(m, 1/2)``: the exact two-sided McNemar (sign) test gives the p-value

    p = min(1, 2 * P(X <= min(improved, regressed))),  X ~ Binomial(m, 1/2)

and the exact (Clopper-Pearson) interval ``[q_lo, q_hi]`` on ``q = P(improved | changed)``
maps to an interval on the gain, ``m * (2q - 1) / n``. Both are exact at any sample size
(no normal approximation, which fails for the few changed items of a small eval).

With several sampled answers per item (avg@k), an item's score is its fraction of accurate
answers and ``gain = mean(after - before)``. The sign test above stays exact (improved: the
item's score rose); the interval is then the normal one on the mean paired difference,
``gain +- z * sd(after - before) / sqrt(n)``, sound for the hundreds of items a report uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from math import exp, fsum, log, log1p, sqrt
from statistics import NormalDist, stdev
from typing import Any


@dataclass(frozen=True)
class PairedGain:
    """Accuracies in percent, gain and its interval in percentage points."""

    num_items: int
    before: float
    after: float
    gain: float
    ci_low: float
    ci_high: float
    improved: int
    regressed: int
    p_value: float
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=16)
def _log_binomial_coefficients(m: int) -> tuple[float, ...]:
    """``log C(m, i)`` for ``i = 0..m``, from the exact integers (``math.log`` reads an int of any size)."""
    logs, coefficient = [], 1
    for i in range(m + 1):
        logs.append(log(coefficient))
        coefficient = coefficient * (m - i) // (i + 1)
    return tuple(logs)


def binomial_tail(k: int, m: int, q: float) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(m, q)``: each term ``C(m, i) q^i (1 - q)^(m - i)`` in log space, summed
    after factoring out the largest (a term's factors overflow a float for ``m`` past about 1030, the term does
    not)."""
    if k < 0:
        return 0.0
    if k >= m or q <= 0.0:
        return 1.0
    if q >= 1.0:
        return 0.0
    log_q, log_rest = log(q), log1p(-q)
    logs = [c + i * log_q + (m - i) * log_rest for i, c in enumerate(_log_binomial_coefficients(m)[:k + 1])]
    largest = max(logs)
    return exp(largest) * fsum(exp(x - largest) for x in logs)


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact interval on a binomial proportion: each end leaves ``(1 - confidence) / 2`` in its tail.

    The lower end solves ``P(X >= successes | q) = alpha/2``, the upper ``P(X <= successes | q) = alpha/2``;
    both tails are monotone in ``q``, so bisection finds them to float precision.
    """
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"successes: expected 0 <= successes <= trials, got {successes} of {trials}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected in (0, 1), got {confidence}")
    tail = (1 - confidence) / 2

    def solve(too_low) -> float:  # too_low(q) is True below the answer, False above
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if too_low(mid) else (lo, mid)
        return (lo + hi) / 2

    low = 0.0 if successes == 0 else solve(lambda q: 1 - binomial_tail(successes - 1, trials, q) < tail)
    high = 1.0 if successes == trials else solve(lambda q: binomial_tail(successes, trials, q) > tail)
    return low, high


def paired_gain(before: Sequence[float], after: Sequence[float], confidence: float = 0.95) -> PairedGain:
    """Compare per-item scores of two stages on the same items (same order).

    A score is an item's correctness (bool, or 0/1) or, with several answers per item, its
    fraction of accurate answers in [0, 1]. Returns accuracies, the gain with its ``confidence``
    interval (exact for 0/1 scores), the changed-item counts and the exact two-sided sign
    (McNemar) p-value (see the module docstring).
    """
    if len(before) != len(after):
        raise ValueError(f"after: {len(after)} items, but before has {len(before)}; pair the same items")
    if not before:
        raise ValueError("before: no items to compare")
    if not all(0.0 <= float(x) <= 1.0 for x in (*before, *after)):
        raise ValueError("before: scores must lie in [0, 1] (correctness, or the fraction of accurate answers)")
    n = len(before)
    diffs = [float(a) - float(b) for b, a in zip(before, after, strict=True)]
    improved = sum(1 for d in diffs if d > 0)
    regressed = sum(1 for d in diffs if d < 0)
    changed = improved + regressed
    p_value = min(1.0, 2 * binomial_tail(min(improved, regressed), changed, 0.5)) if changed else 1.0
    gain = sum(diffs) / n
    if all(float(x) in (0.0, 1.0) for x in (*before, *after)):
        q_low, q_high = clopper_pearson(improved, changed, confidence) if changed else (0.5, 0.5)
        low, high = changed * (2 * q_low - 1) / n, changed * (2 * q_high - 1) / n
    else:
        half = NormalDist().inv_cdf(0.5 + confidence / 2) * stdev(diffs) / sqrt(n) if n > 1 else float("inf")
        low, high = gain - half, gain + half
    return PairedGain(num_items=n, before=100.0 * sum(map(float, before)) / n,
                      after=100.0 * sum(map(float, after)) / n, gain=100.0 * gain, ci_low=100.0 * low,
                      ci_high=100.0 * high, improved=improved, regressed=regressed, p_value=p_value,
                      confidence=confidence)
