"""Packing sequences into micro-batches and balancing them across data-parallel ranks.

The work runs in C++ (``qwenlong._C.host``, ``csrc/host/packing.cpp``); without the
extension the same algorithms run in Python (:mod:`.reference`), with equal results.

Balancing cost models (the weight of a sequence of ``L`` tokens):

- ``"tokens"``: ``L``, for work linear in tokens (MLP, logits, memory);
- ``"attention"``: ``L**2``, for attention-bound steps;
- ``"mixed"``: ``L + attention_weight * L**2``. Per layer, a dense block costs about
  ``24 h^2 L`` FLOPs outside attention and ``2 h L^2`` in causal attention (hidden size
  ``h``), so ``attention_weight = 1 / (12 h)`` models that block; measure your own model.
"""

from __future__ import annotations

import numpy as np

from qwenlong import _C

from . import reference

COSTS = ("tokens", "attention", "mixed")
_INT64 = np.iinfo(np.int64)
# partitions are data-parallel ranks; each is returned as a list, so an absurd k would fill the memory
MAX_PARTITIONS = 1 << 20


def _host_has(name: str) -> bool:
    return _C.host is not None and hasattr(_C.host, name)


def _as_lengths(lengths) -> np.ndarray:
    """``lengths`` as a 1-D int64 array; a list, tuple, numpy array or CPU tensor of ints."""
    if hasattr(lengths, "detach"):  # a torch tensor
        lengths = lengths.detach().cpu().numpy()
    array = np.asarray(lengths)
    if array.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {array.shape}")
    if array.size and array.dtype == object:  # Python ints too large for int64 (or not ints at all)
        for i, value in enumerate(array):
            _as_int(f"lengths[{i}]", value)
    elif array.size and array.dtype.kind not in "iu":
        raise ValueError(f"lengths must hold integers, got dtype {array.dtype}")
    elif array.size and array.dtype.kind == "u" and int(array.max()) > _INT64.max:
        i = int(np.argmax(array > _INT64.max))
        raise ValueError(f"lengths[{i}] must fit in int64, got {int(array[i])}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _as_int(name: str, value, high: int = _INT64.max) -> int:
    """``value`` as a Python int that fits int64 (what the extension takes) and is at most ``high``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not _INT64.min <= int(value) <= _INT64.max:
        raise ValueError(f"{name} must fit in int64, got {int(value)}")
    if int(value) > high:
        raise ValueError(f"{name} must be at most {high}, got {int(value)}")
    return int(value)


def partition_costs(lengths, cost: str = "tokens", attention_weight: float | None = None) -> np.ndarray:
    """Per-sequence float64 weights for balancing under ``cost`` (see the module docstring)."""
    lengths = _as_lengths(lengths)
    if lengths.size and lengths.min() < 0:  # a negative length squared would pass as a real cost
        i = int(np.argmin(lengths))
        raise ValueError(f"lengths[{i}] is negative ({int(lengths[i])})")
    lengths = lengths.astype(np.float64)
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    if (cost == "mixed") != (attention_weight is not None):
        raise ValueError(f"attention_weight must be given exactly when cost='mixed', got cost={cost!r} and "
                         f"attention_weight={attention_weight!r}")
    if cost == "tokens":
        return lengths
    if cost == "attention":
        return lengths * lengths
    if not (attention_weight >= 0 and np.isfinite(attention_weight)):
        raise ValueError(f"attention_weight must be finite and non-negative, got {attention_weight!r}")
    return lengths + attention_weight * (lengths * lengths)


def pack_by_token_budget(lengths, budget: int) -> list[list[int]]:
    """Pack sequences into as few micro-batches of at most ``budget`` tokens as best-fit decreasing finds.

    Returns micro-batches as lists of sequence indices (ascending), in the order they were
    opened. Every index appears exactly once. Raises ``ValueError`` naming a sequence longer
    than ``budget``, a negative length, or a non-positive ``budget``. O(n log n).
    """
    lengths, budget = _as_lengths(lengths), _as_int("budget", budget)
    if _host_has("pack_by_token_budget"):
        return _C.host.pack_by_token_budget(lengths, budget)
    return reference.pack_by_token_budget(lengths.tolist(), budget)


def balance_partitions(lengths, k: int, *, cost: str = "tokens", attention_weight: float | None = None) -> list[list[int]]:
    """Split sequences into ``k`` groups of near-equal cost (Karmarkar-Karp largest differencing).

    Returns ``k`` lists of sequence indices (ascending), heaviest group first; groups are
    empty when there are fewer than ``k`` sequences. The spread between the heaviest and
    lightest group is at most the largest single cost. O(n log n + n k log k).
    """
    k = _as_int("k", k, MAX_PARTITIONS)
    weights = partition_costs(lengths, cost, attention_weight)
    if _host_has("balance_partitions"):
        return _C.host.balance_partitions(weights, k)
    return reference.balance_partitions(weights.tolist(), k)


def balance_and_pack(
    lengths,
    k: int,
    budget: int,
    *,
    cost: str = "tokens",
    attention_weight: float | None = None,
    equal_micro_batches: bool = True,
) -> list[list[list[int]]]:
    """Balance sequences across ``k`` data-parallel ranks, then pack each rank into micro-batches.

    Returns ``ranks[r][j]``: the sequence indices of rank ``r``'s micro-batch ``j``, each
    within ``budget`` tokens, largest first so micro-step ``j`` carries similar work on
    every rank. With ``equal_micro_batches`` (what data parallelism needs: every rank runs
    the same number of micro-steps) ranks with fewer micro-batches split their heaviest
    ones; a micro-batch is left empty only when a rank has fewer sequences than steps.
    """
    lengths, k, budget = _as_lengths(lengths), _as_int("k", k, MAX_PARTITIONS), _as_int("budget", budget)
    weights = partition_costs(lengths, cost, attention_weight)
    if _host_has("balance_and_pack"):
        return _C.host.balance_and_pack(lengths, weights, k, budget, bool(equal_micro_batches))
    return reference.balance_and_pack(lengths.tolist(), weights.tolist(), k, budget, bool(equal_micro_batches))
