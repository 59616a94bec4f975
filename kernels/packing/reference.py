"""Pure-Python packing and balancing: the test reference and the fallback without ``qwenlong._C``.

Same algorithms and tie-breaking as ``csrc/host/packing.cpp`` (ties always go to the lower
index), so the C++ results must equal these exactly. Inputs are plain lists: ``lengths`` of
ints, ``weights`` of floats. Errors are ``ValueError`` with the same messages as the C++.
"""

from __future__ import annotations

import bisect
import heapq


def check_lengths(lengths: list[int], budget: int) -> None:
    """budget > 0, and every length in [0, budget]; names the first bad index."""
    if budget <= 0:
        raise ValueError(f"budget must be a positive number of tokens, got {budget}")
    for i, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"lengths[{i}] is negative ({length})")
        if length > budget:
            raise ValueError(
                f"sequence {i} has {length} tokens, more than the budget of {budget}: raise the budget or truncate it"
            )


def _check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be a positive number of partitions, got {k}")


def _largest_first(values, items: list[int]) -> list[int]:
    return sorted(items, key=lambda i: (-values[i], i))


def pack_best_fit_decreasing(lengths: list[int], items: list[int], budget: int) -> list[list[int]]:
    """Best-fit decreasing over ``items`` (indices into ``lengths``).

    Longest first, each sequence goes to the micro-batch with the least free room that
    still fits it (the earliest micro-batch on ties); a new one opens when none fits.
    Micro-batches come out in opening order, each listing its indices ascending.
    """
    bins: list[list[int]] = []
    free_room: list[tuple[int, int]] = []  # sorted (free tokens, micro-batch index)
    for i in _largest_first(lengths, items):
        slot = bisect.bisect_left(free_room, (lengths[i], -1))
        if slot == len(free_room):
            bisect.insort(free_room, (budget - lengths[i], len(bins)))
            bins.append([i])
        else:
            room, b = free_room.pop(slot)
            bins[b].append(i)
            bisect.insort(free_room, (room - lengths[i], b))
    return [sorted(b) for b in bins]


def pack_by_token_budget(lengths: list[int], budget: int) -> list[list[int]]:
    """Micro-batches (lists of sequence indices) of at most ``budget`` tokens each."""
    check_lengths(lengths, budget)
    return pack_best_fit_decreasing(lengths, list(range(len(lengths))), budget)


def balance_partitions(weights: list[float], k: int) -> list[list[int]]:
    """Karmarkar-Karp largest differencing into ``k`` groups of near-equal total weight.

    Every item starts as a k-tuple of subsets (itself and k-1 empty ones). The two tuples
    with the largest spread (heaviest minus lightest subset) are merged, heaviest subset of
    the first with the lightest of the second, until one tuple is left. A subset is
    ``[weight, root, items]``; subsets sort heaviest first, then by root (the item that
    represents it). Tuples tie on spread by id: items by index, then merges in order.
    Groups come out heaviest first, each ascending; empty groups last.
    """
    _check_k(k)
    for i, w in enumerate(weights):
        if not (0.0 <= w < float("inf")):
            raise ValueError(f"weights[{i}] must be finite and non-negative, got {w:f}")
    if k == 1:
        return [list(range(len(weights)))]

    def spread(parts):
        return parts[0][0] - (parts[-1][0] if len(parts) == k else 0.0)

    heap = [(-w, i, [[w, i, [i]]]) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    next_id = len(weights)
    while len(heap) > 1:
        a = heapq.heappop(heap)[2]
        b = heapq.heappop(heap)[2]
        a_padded = a + [None] * (k - len(a))
        b_padded = b + [None] * (k - len(b))
        merged = []
        for from_a, from_b in zip(a_padded, reversed(b_padded), strict=True):
            if from_a is not None and from_b is not None:
                merged.append([from_a[0] + from_b[0], from_a[1], from_a[2] + from_b[2]])
            elif from_a is not None or from_b is not None:
                merged.append(from_a or from_b)
        merged.sort(key=lambda part: (-part[0], part[1]))
        heapq.heappush(heap, (-spread(merged), next_id, merged))
        next_id += 1
    groups = [sorted(part[2]) for part in heap[0][2]] if heap else []
    return groups + [[] for _ in range(k - len(groups))]


def split_to_count(lengths: list[int], micro_batches: list[list[int]], count: int) -> list[list[int]]:
    """Halve the heaviest micro-batch with two or more sequences until there are ``count``.

    Halving puts sequences longest first into the half with fewer tokens (the first on
    ties); the first half keeps the micro-batch's place, the second is appended. Empty
    micro-batches are appended only when every micro-batch holds a single sequence.
    """
    micro_batches = [list(mb) for mb in micro_batches]
    while len(micro_batches) < count:
        splittable = [b for b, mb in enumerate(micro_batches) if len(mb) >= 2]
        if not splittable:
            break
        b = max(splittable, key=lambda b: (sum(lengths[i] for i in micro_batches[b]), -b))
        halves: list[list[int]] = [[], []]
        tokens = [0, 0]
        for i in _largest_first(lengths, micro_batches[b]):
            side = 0 if tokens[0] <= tokens[1] else 1
            halves[side].append(i)
            tokens[side] += lengths[i]
        micro_batches[b] = sorted(halves[0])
        micro_batches.append(sorted(halves[1]))
    return micro_batches + [[] for _ in range(count - len(micro_batches))]


def sort_by_tokens(lengths: list[int], micro_batches: list[list[int]]) -> list[list[int]]:
    """Largest token total first; then by first index (empty micro-batches last)."""
    return sorted(micro_batches, key=lambda mb: (-sum(lengths[i] for i in mb), mb[0] if mb else float("inf")))


def balance_and_pack(
    lengths: list[int], weights: list[float], k: int, budget: int, equal_micro_batches: bool
) -> list[list[list[int]]]:
    """Karmarkar-Karp on ``weights`` into k ranks, then best-fit decreasing per rank."""
    _check_k(k)
    check_lengths(lengths, budget)
    ranks = [pack_best_fit_decreasing(lengths, group, budget) for group in balance_partitions(weights, k)]
    if equal_micro_batches:
        most = max(len(micro_batches) for micro_batches in ranks)
        ranks = [split_to_count(lengths, micro_batches, most) for micro_batches in ranks]
    return [sort_by_tokens(lengths, micro_batches) for micro_batches in ranks]
