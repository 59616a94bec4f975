"""Difficulty bins and the equal draw from them (l15.md section 2, before training).

Each item's difficulty is its pass@k under the base model. Items are binned per data source, and
every bin of a source gives the same number of items, so the training set spreads evenly over
difficulty instead of following the source's own skew (most items of a hard source unsolved, most of
an easy one always solved).

Bin edges, for ``num_bins = B >= 3``: bin 0 holds pass@k exactly 0 (never solved), bin B-1 exactly 1
(always solved), and the B-2 bins between cut the open interval (0, 1) into equal widths
``w = 1/(B-2)``: bin 1 holds (0, w), bin i (1 < i < B-1) holds [(i-1)w, iw). Why these edges:

* the two ends are their own bins because they are different in kind, not in degree: a GRPO group
  whose answers are all wrong or all right has zero advantage everywhere and teaches nothing until the
  policy moves (dynamic sampling drops such groups), so they must not be mixed with the items that
  give a gradient at once, and a draw should be able to see how many of them it takes;
* equal widths, not quantiles: quantile bins hold equal counts by construction, so drawing equally
  from them would change nothing; equal widths let the draw flatten the difficulty distribution,
  which is the point;
* the ends are exact: pass@k is 0 only when no sample was accurate and 1 only when no k-subset of
  the samples is all wrong, both computed exactly (no rounding can move an item across them).

The default B = 5 gives [0], (0, 1/3), [1/3, 2/3), [2/3, 1), [1]; with pass@1 over 8 samples
(c/8) the middle bins hold c = 1-2, 3-5 and 6-7.

Drawing: every non-empty bin of a source gets the same quota; a bin with fewer items than its quota
gives all it has and the rest goes to the other bins evenly (as the task-balanced sampler shares a
batch between tasks), so the source reaches its target when it holds enough items. Without a target,
each non-empty bin gives as many items as the smallest non-empty bin holds: the most a perfectly
equal draw can take. Empty bins are reported and give nothing. Items are drawn with a random
generator seeded by (seed, source, bin): a source's draw does not depend on what other sources hold.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from qwenlong.algorithms import metrics

DEFAULT_BINS = 5
EDGE_SLACK = 1e-9


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one item from ``c`` accurate answers out of ``n`` samples: the RL metrics' unbiased estimator
    (``qwenlong.algorithms.metrics.pass_at_k``), ``1 - C(n-c, k) / C(n, k)``. Its ends are exact (c = 0 gives
    1 - 1, fewer than k wrong answers 1 - 0), which the end bins rely on; a value between them that fp64 rounds
    to an end (n = 64, k = 32, c = 32: 1 - 3e-23) is kept just inside it."""
    if not 0 <= c <= n:
        raise ValueError(f"c: expected 0 <= c <= n={n}, got {c}")
    value = float(metrics.pass_at_k(torch.tensor([c]), n, k)[0])
    if 0 < c and n - c >= k:  # solved by some k-subsets, not all: never an end bin, though 1 - 1e-23 rounds to 1
        value = min(max(value, math.ulp(0.0)), math.nextafter(1.0, 0.0))
    return value


def check_num_bins(num_bins: int) -> None:
    """At least the two end bins and one between them: items solved sometimes need a bin of their own."""
    if num_bins < 3:
        raise ValueError(f"num_bins: expected >= 3 (pass@k = 0, values between, pass@k = 1), got {num_bins}")


def bin_index(value: float, num_bins: int = DEFAULT_BINS) -> int:
    """The bin of a pass@k value (see the module docstring for the edges)."""
    check_num_bins(num_bins)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"pass@k: expected a value in [0, 1], got {value}")
    if value == 0.0:
        return 0
    if value == 1.0:
        return num_bins - 1
    inner = num_bins - 2
    # a value on an edge (c/n == i/m, however the float rounded it) goes to the upper bin, as [low, high)
    # says: distinct pass@k values of real sample counts lie much further apart than EDGE_SLACK
    return 1 + min(int(value * inner + EDGE_SLACK), inner - 1)


def bin_label(index: int, num_bins: int = DEFAULT_BINS) -> str:
    """The bin's range as text, e.g. ``"0"``, ``"(0, 0.333)"``, ``"[0.333, 0.667)"``, ``"1"``."""
    check_num_bins(num_bins)
    if not 0 <= index < num_bins:
        raise ValueError(f"index: expected 0 <= index < {num_bins}, got {index}")
    if index == 0:
        return "0"
    if index == num_bins - 1:
        return "1"
    inner = num_bins - 2
    low, high = (index - 1) / inner, index / inner
    return f"({low:.3g}, {high:.3g})" if index == 1 else f"[{low:.3g}, {high:.3g})"


def draw_counts(sizes: Sequence[int], target: int | None = None) -> list[int]:
    """How many items each bin gives: equal quotas over the non-empty bins, capped by what a bin holds,
    the shortfall shared by the others (a remainder goes one each to the bins with the most left, the
    lower index first on a tie). ``target``: the source's total (more than it holds: all of it); None:
    the smallest non-empty bin's size from every non-empty bin."""
    if any(size < 0 for size in sizes):
        raise ValueError(f"sizes: expected counts >= 0, got {list(sizes)}")
    filled = [i for i, size in enumerate(sizes) if size]
    if target is None:
        target = min((sizes[i] for i in filled), default=0) * len(filled)
    if target < 0:
        raise ValueError(f"target: expected >= 0, got {target}")
    counts = [0] * len(sizes)
    remaining = min(target, sum(sizes))
    open_bins = filled
    while remaining and open_bins:
        share = remaining // len(open_bins)
        if share == 0:  # fewer items left than open bins: one each to those with the most left
            for i in sorted(open_bins, key=lambda i: (counts[i] - sizes[i], i))[:remaining]:
                counts[i] += 1
            break
        for i in open_bins:
            take = min(share, sizes[i] - counts[i])
            counts[i] += take
            remaining -= take
        open_bins = [i for i in open_bins if counts[i] < sizes[i]]
    return counts


@dataclass(frozen=True)
class BinDraw:
    """One bin of one source: its range, the items it held (ids, in data order) and those drawn."""

    label: str
    held: tuple[str, ...]
    drawn: tuple[str, ...]


@dataclass
class Selection:
    """The draw of every source (``sources``: data source -> its bins in order)."""

    num_bins: int
    k: int
    target: int | None
    seed: int
    sources: dict[str, list[BinDraw]] = field(default_factory=dict)

    def selected(self) -> set[tuple[str, str]]:
        """The ``(data_source, id)`` keys drawn from every bin of every source."""
        return {(source, item) for source, bins in self.sources.items() for b in bins for item in b.drawn}

    def summary(self) -> dict:
        """Per source and bin: items held and drawn (what ``summary.json`` reports)."""
        sources = {}
        for source, bins in sorted(self.sources.items()):
            sources[source] = {"items": sum(len(b.held) for b in bins), "drawn": sum(len(b.drawn) for b in bins),
                               "bins": [{"bin": i, "range": b.label, "items": len(b.held),
                                         "drawn": len(b.drawn)} for i, b in enumerate(bins)]}
        return {"k": self.k, "num_bins": self.num_bins,
                "bin_edges": [bin_label(i, self.num_bins) for i in range(self.num_bins)],
                "target_per_source": self.target, "seed": self.seed,
                "items": sum(s["items"] for s in sources.values()),
                "drawn": sum(s["drawn"] for s in sources.values()), "sources": sources}

    def to_markdown(self) -> str:
        """A table: one row per source, one column per bin, ``drawn/held`` in each cell."""
        labels = [bin_label(i, self.num_bins) for i in range(self.num_bins)]
        lines = [f"| source (pass@{self.k}: drawn/held) | " + " | ".join(labels) + " | total |",
                 "|---|" + "---|" * (self.num_bins + 1)]
        for source, bins in sorted(self.sources.items()):
            cells = [f"{len(b.drawn)}/{len(b.held)}" for b in bins]
            total = f"{sum(len(b.drawn) for b in bins)}/{sum(len(b.held) for b in bins)}"
            lines.append(f"| {source} | " + " | ".join(cells) + f" | {total} |")
        return "\n".join(lines) + "\n"


def select_balanced(items: Iterable[tuple[str, str, float]], num_bins: int = DEFAULT_BINS, *,
                    target: int | None = None, seed: int = 0, k: int = 1) -> Selection:
    """Bin ``(data_source, id, pass@k)`` items per source and draw equally from each bin (module
    docstring). ``target``: items per source (None: the smallest non-empty bin's size from every
    non-empty bin). ``k`` is recorded for the report only. Ids must be unique within a source."""
    check_num_bins(num_bins)
    if target is not None and target < 0:
        raise ValueError(f"target: expected >= 0, got {target}")
    binned: dict[str, list[list[str]]] = {}
    seen: set[tuple[str, str]] = set()
    for source, item, value in items:
        if (source, item) in seen:
            raise ValueError(f"id: {item!r} appears twice in data source {source!r}")
        seen.add((source, item))
        binned.setdefault(source, [[] for _ in range(num_bins)])[bin_index(value, num_bins)].append(item)
    selection = Selection(num_bins, k, target, seed)
    for source, bins in binned.items():
        counts = draw_counts([len(b) for b in bins], target)
        draws = []
        for index, (held, count) in enumerate(zip(bins, counts, strict=True)):
            chosen = set(random.Random(f"difficulty:{seed}:{source}:{index}").sample(range(len(held)), count))
            draws.append(BinDraw(bin_label(index, num_bins), tuple(held),
                                 tuple(item for i, item in enumerate(held) if i in chosen)))
        selection.sources[source] = draws
    return selection


def selected_in_order(records: Iterable, selection: Selection) -> list:
    """The drawn records, in their input order (the sampler shuffles them anyway; a stable file diffs well)."""
    keys = selection.selected()
    return [r for r in records if (r.data_source, r.id) in keys]

