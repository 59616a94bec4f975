"""Packing and balancing: the C++ (qwenlong._C.host) against the pure-Python reference,
plus invariants that hold for any correct answer, adversarial inputs and errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwenlong import _C
from qwenlong.kernels import packing
from qwenlong.kernels.packing import api, reference

needs_host = pytest.mark.skipif(
    _C.host is None or not hasattr(_C.host, "balance_and_pack"), reason=f"qwenlong._C._host not built: {_C.host_error}"
)
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def budget_and_lengths(draw, max_items: int = 60):
    budget = draw(st.integers(1, 200))
    lengths = draw(st.lists(st.integers(0, budget), max_size=max_items))
    return budget, lengths


def assert_partition_of(groups, n: int):
    flat = sorted(itertools.chain.from_iterable(groups))
    assert flat == list(range(n)), "every index must appear exactly once"
    for group in groups:
        assert group == sorted(group)


def assert_within_budget(micro_batches, lengths, budget: int):
    for mb in micro_batches:
        assert sum(lengths[i] for i in mb) <= budget


# ---- C++ equals the reference -------------------------------------------------------------


@needs_host
@SETTINGS
@given(budget_and_lengths())
def test_pack_matches_reference(case):
    budget, lengths = case
    got = _C.host.pack_by_token_budget(np.array(lengths, dtype=np.int64), budget)
    assert got == reference.pack_by_token_budget(lengths, budget)
    assert_partition_of(got, len(lengths))
    assert_within_budget(got, lengths, budget)


@needs_host
@SETTINGS
@given(st.lists(st.integers(0, 10_000), max_size=80), st.integers(1, 9), st.sampled_from(api.COSTS))
def test_balance_matches_reference(lengths, k, cost):
    weights = api.partition_costs(lengths, cost, 1e-3 if cost == "mixed" else None)
    got = _C.host.balance_partitions(weights, k)
    assert got == reference.balance_partitions(weights.tolist(), k)
    assert len(got) == k
    assert_partition_of(got, len(lengths))
    totals = [float(weights[g].sum()) if g else 0.0 for g in got]
    slack = 1e-9 * max(totals, default=0.0)  # numpy sums in another order than Karmarkar-Karp
    assert all(a >= b - slack for a, b in itertools.pairwise(totals)), "groups come heaviest first"
    # Karmarkar-Karp never leaves a spread above the largest single weight.
    if lengths:
        assert max(totals) - min(totals) <= weights.max() * (1 + 1e-12)


@needs_host
@SETTINGS
@given(budget_and_lengths(), st.integers(1, 6), st.booleans())
def test_balance_and_pack_matches_reference(case, k, equal):
    budget, lengths = case
    weights = api.partition_costs(lengths, "tokens")
    got = _C.host.balance_and_pack(np.array(lengths, dtype=np.int64), weights, k, budget, equal)
    assert got == reference.balance_and_pack(lengths, weights.tolist(), k, budget, equal)
    assert len(got) == k
    assert_partition_of([mb for rank in got for mb in rank], len(lengths))
    for rank in got:
        assert_within_budget(rank, lengths, budget)
        tokens = [sum(lengths[i] for i in mb) for mb in rank]
        assert tokens == sorted(tokens, reverse=True)
    if equal:
        assert len({len(rank) for rank in got}) == 1


def test_python_fallback_equals_extension(monkeypatch):
    """Without the extension the public API gives the same answers (from the reference)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 500, size=300)
    expected = (
        packing.pack_by_token_budget(lengths, 1000),
        packing.balance_partitions(lengths, 4, cost="attention"),
        packing.balance_and_pack(lengths, 3, 800),
    )
    monkeypatch.setattr(api._C, "host", None)
    fallback = (
        packing.pack_by_token_budget(lengths, 1000),
        packing.balance_partitions(lengths, 4, cost="attention"),
        packing.balance_and_pack(lengths, 3, 800),
    )
    assert fallback == expected


# ---- behaviour on hand-made inputs ---------------------------------------------------------


def test_best_fit_picks_the_tightest_micro_batch():
    # 6 opens [6], 5 opens [5], 4 opens [4]; 3 fits best in [5] (room 3), 2 in [6] (room 2).
    assert packing.pack_by_token_budget([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]


@pytest.mark.parametrize(
    ("lengths", "budget", "expected"),
    [
        ([], 10, []),
        ([4, 4, 4, 4], 8, [[0, 1], [2, 3]]),  # all equal
        ([0, 0, 0], 5, [[0, 1, 2]]),  # empty sequences still land somewhere
        ([10, 1, 1], 10, [[0], [1, 2]]),  # one sequence fills the budget exactly
    ],
)
def test_pack_adversarial(lengths, budget, expected):
    assert packing.pack_by_token_budget(lengths, budget) == expected


def test_pack_one_huge_sequence_names_it():
    with pytest.raises(ValueError, match=r"sequence 2 has 5000 tokens, more than the budget of 4096"):
        packing.pack_by_token_budget([10, 20, 5000, 9000], 4096)


def test_balance_equal_lengths_is_perfect():
    groups = packing.balance_partitions([7] * 24, 4)
    assert [len(g) for g in groups] == [6, 6, 6, 6]


def test_balance_more_ranks_than_sequences():
    assert packing.balance_partitions([3, 9], 4) == [[1], [0], [], []]
    ranks = packing.balance_and_pack([3, 9], 4, 10)
    assert ranks == [[[1]], [[0]], [[]], [[]]]


def test_balance_cost_model_changes_the_split():
    lengths = [100, 50, 50, 10, 10]
    # by tokens a perfect split exists: 100 + 10 against 50 + 50 + 10
    assert packing.balance_partitions(lengths, 2, cost="tokens") == [[0, 4], [1, 2, 3]]
    # by attention cost the 100-token sequence (10000) outweighs all the others (5200)
    assert packing.balance_partitions(lengths, 2, cost="attention") == [[0], [1, 2, 3, 4]]


def test_equal_micro_batches_splits_the_rank_with_fewer():
    # Karmarkar-Karp gives rank 0 {5, 3, 3} (11 tokens: two micro-batches under budget 10)
    # and rank 1 {5, 4} (9 tokens: one); equalising halves rank 1's micro-batch.
    lengths = [5, 5, 4, 3, 3]
    assert packing.balance_and_pack(lengths, 2, 10, equal_micro_batches=False) == [[[1, 3], [4]], [[0, 2]]]
    assert packing.balance_and_pack(lengths, 2, 10, equal_micro_batches=True) == [[[1, 3], [4]], [[0], [2]]]


def test_equal_micro_batches_pads_only_when_a_rank_has_too_few_sequences():
    # rank 0 gets the three 8s (two micro-batches under budget 20), rank 1 the lone 20,
    # which cannot be split: it runs an empty second micro-step.
    assert packing.balance_and_pack([8, 8, 8, 20], 2, 20) == [[[0, 1], [2]], [[3], []]]


def test_accepts_numpy_and_tensors():
    lengths = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = packing.pack_by_token_budget(lengths, 10)
    assert packing.pack_by_token_budget(np.array(lengths, dtype=np.int32), 10) == expected
    assert packing.pack_by_token_budget(torch.tensor(lengths), np.int64(10)) == expected


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: packing.pack_by_token_budget([1, -2, 3], 8), r"lengths\[1\] is negative \(-2\)"),
        (lambda: packing.pack_by_token_budget([1, 2], 0), r"budget must be a positive number of tokens, got 0"),
        (lambda: packing.pack_by_token_budget([1, 2], 2.5), r"budget must be an int"),
        (lambda: packing.pack_by_token_budget([1.5, 2], 8), r"lengths must hold integers"),
        (lambda: packing.pack_by_token_budget([[1, 2]], 8), r"lengths must be 1-D"),
        (lambda: packing.balance_partitions([1, 2], 0), r"k must be a positive number of partitions, got 0"),
        (lambda: packing.balance_partitions([1, -2], 2), r"lengths\[1\] is negative \(-2\)"),
        (lambda: packing.balance_partitions([1, 2], 2, cost="flops"), r"cost must be one of"),
        (lambda: packing.balance_partitions([1, 2], 2, cost="mixed"), r"attention_weight must be given"),
        (lambda: packing.balance_partitions([1], 2, cost="mixed", attention_weight=-1.0), r"attention_weight must"),
        (lambda: packing.balance_and_pack([1, 2], -1, 8), r"k must be a positive number of partitions, got -1"),
        (lambda: packing.balance_and_pack([1, 9], 2, 8), r"sequence 1 has 9 tokens"),
    ],
)
def test_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("use_reference", [False, True])
def test_reference_raises_the_same_messages(monkeypatch, use_reference):
    if use_reference:
        monkeypatch.setattr(api._C, "host", None)
    with pytest.raises(ValueError, match=r"^sequence 0 has 9 tokens, more than the budget of 8: raise"):
        packing.pack_by_token_budget([9, -1], 8)
    with pytest.raises(ValueError, match=r"^lengths\[0\] is negative \(-1\)$"):
        packing.balance_and_pack([-1, 9], 2, 8)
    with pytest.raises(ValueError, match=r"^k must be a positive number of partitions, got 0$"):
        packing.balance_and_pack([1], 0, 8)
    for cost in ("tokens", "attention"):  # squared, a negative length passed as a real cost
        with pytest.raises(ValueError, match=r"^lengths\[0\] is negative \(-5\)$"):
            packing.balance_partitions([-5, 3], 2, cost=cost)


@needs_host
@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), -1.0, float("inf"), -float("inf"), -1e-320])
def test_extension_and_reference_name_bad_weights_alike(bad):
    """The extension printed a NaN with its sign bit set as "-nan" where Python (and so the reference) says
    "nan": the two paths must raise the same message for every weight they refuse."""
    weights = [1.0, bad, 2.0]
    messages = []
    for call in (lambda: _C.host.balance_partitions(np.array(weights), 2),
                 lambda: reference.balance_partitions(weights, 2),
                 lambda: _C.host.balance_and_pack(np.array([1, 1, 1]), np.array(weights), 2, 4, True),
                 lambda: reference.balance_and_pack([1, 1, 1], weights, 2, 4, True)):
        with pytest.raises(ValueError, match=r"^weights\[1\] must be finite and non-negative, got ") as error:
            call()
        messages.append(str(error.value))
    assert len(set(messages)) == 1, messages


# ---- cu_seqlens / position ids ------------------------------------------------------------


def _cu_seqlens_loop(lengths):
    """The reference ``build_cu_seqlens`` is checked against: a plain running sum, so it must not call the
    builder (tests that only need cu_seqlens as an input call ``build_cu_seqlens`` itself)."""
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return out


def _position_ids_loop(lengths):
    return [p for length in lengths for p in range(length)]


@SETTINGS
@given(st.lists(st.integers(0, 40), max_size=30))
def test_builders_match_loops(lengths):
    cu_seqlens = packing.build_cu_seqlens(lengths)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == _cu_seqlens_loop(lengths)
    position_ids = packing.build_position_ids(torch.tensor(lengths, dtype=torch.int32))
    assert position_ids.dtype == torch.int64
    assert position_ids.tolist() == _position_ids_loop(lengths)


def test_builders_errors():
    with pytest.raises(ValueError, match=r"lengths\[1\] is negative \(-3\)"):
        packing.build_cu_seqlens([2, -3])
    with pytest.raises(ValueError, match=r"lengths must hold integers"):
        packing.build_position_ids([1.0, 2.0])
    with pytest.raises(ValueError, match=r"more than int32 cu_seqlens can index"):
        packing.build_cu_seqlens([2**30, 2**30])
    reversed_view = np.array([2, 1, 3])[::-1]  # negative strides, which torch tensors cannot have
    assert packing.build_cu_seqlens(reversed_view).tolist() == [0, 3, 4, 6]
    assert packing.build_position_ids(reversed_view).tolist() == [0, 1, 2, 0, 0, 1]


# ---- values beyond what the index types hold: a ValueError naming the argument, before any work ----


@pytest.mark.parametrize("use_reference", [False, True])
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: packing.pack_by_token_budget([1, 2], 2**70),
         r"^budget must fit in int64, got 1180591620717411303424$"),  # was a pybind TypeError
        (lambda: packing.pack_by_token_budget([1, 2], -2**63 - 1), r"^budget must fit in int64"),
        (lambda: packing.pack_by_token_budget([1, 2**70], 8), r"^lengths\[1\] must fit in int64"),
        (lambda: packing.pack_by_token_budget(np.array([3, 2**63 + 5], dtype=np.uint64), 8),
         r"^lengths\[1\] must fit in int64, got 9223372036854775813$"),  # was: 'lengths[1] is negative'
        (lambda: packing.balance_partitions([1, 2], 2**70), r"^k must fit in int64"),
        (lambda: packing.balance_partitions([1, 2], 2**40), r"^k must be at most 1048576"),
        (lambda: packing.balance_and_pack([1, 2], 2**64, 8), r"^k must fit in int64"),
        (lambda: packing.balance_and_pack([1, 2], 2, 2**64), r"^budget must fit in int64"),
    ],
)
def test_out_of_range_ints_are_value_errors_naming_the_argument(monkeypatch, use_reference, call, message):
    if use_reference:
        monkeypatch.setattr(api._C, "host", None)
    with pytest.raises(ValueError, match=message):
        call()
    assert packing.pack_by_token_budget([3, 5, 2], 2**62) == [[0, 1, 2]]  # a huge budget that fits is fine


@pytest.mark.parametrize("build", [packing.build_cu_seqlens, packing.build_position_ids])
@pytest.mark.parametrize(
    ("lengths", "message"),
    [
        ([2**62, 2**62], r"^lengths\[0\] is 4611686018427387904 tokens, more than int32 can index"),  # sum wraps
        (torch.tensor([5, 2**62, 2**62, 2**62, 2**62]), r"^lengths\[1\] is \d+ tokens"),  # wraps to 5 in int64
        ([3, 2**70], r"^lengths\[1\] must be an integer token count, got 1180591620717411303424"),
        (np.array([1, 2**64 - 1], dtype=np.uint64), r"^lengths\[1\] is 18446744073709551615 tokens"),
        (torch.tensor([2**63 + 1], dtype=torch.uint64), r"^lengths\[0\] is 9223372036854775809 tokens"),
        ([2**40], r"^lengths\[0\] is 1099511627776 tokens"),
        ([2**30, 2**30, 2**30], r"^lengths add up to 3221225472 tokens, more than int32"),
        ([3, "a"], r"^lengths must hold integers"),
    ],
)
def test_builders_refuse_lengths_that_overflow(build, lengths, message):
    with pytest.raises(ValueError, match=message):
        build(lengths)


def test_builders_take_unsigned_lengths_that_fit():
    for lengths in (np.array([5, 0, 2], dtype=np.uint64), torch.tensor([5, 0, 2], dtype=torch.uint64),
                    np.array([5, 0, 2], dtype=np.uint32)):
        assert packing.build_cu_seqlens(lengths).tolist() == [0, 5, 5, 7]
        assert packing.build_position_ids(lengths).tolist() == [0, 1, 2, 3, 4, 0, 1]
