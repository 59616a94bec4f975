"""RL math (qwenlong.algorithms) against plain-Python loop references and hand-checked cases."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest
import torch

from qwenlong.algorithms import (
    GroupCollector,
    broadcast_to_tokens,
    group_accuracy_metrics,
    group_advantages,
    informative_groups,
    is_accurate,
    kl_estimate,
    overlong_penalty,
    pass_at_k,
    segment_sum,
    task_normalized_advantages,
)
from qwenlong.kernels.logprobs.policy_math import KL_CLAMP, aggregate_tokens, loss_normalizer


def random_rewards(num_groups: int, group_size: int, seed: int) -> torch.Tensor:
    """Mix of binary and continuous rewards, with some all-equal groups."""
    gen = torch.Generator().manual_seed(seed)
    rewards = (torch.rand(num_groups, group_size, generator=gen) > 0.5).double()
    rewards[::3] = torch.rand(len(rewards[::3]), group_size, generator=gen, dtype=torch.float64)
    rewards[1::5] = 1.0
    return rewards


def random_cu_seqlens(batch: int, seed: int, max_len: int = 9) -> torch.Tensor:
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, rng.randint(2, max_len)]) for _ in range(batch)]
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


# ---------------------------------------------------------------------------------------- advantages


def reference_group_advantages(rewards, normalize_std, eps):
    out = []
    for row in rewards.tolist():
        mean = sum(row) / len(row)
        std = statistics.stdev(row) if len(row) > 1 else 0.0
        out.append([(r - mean) / (std + eps) if normalize_std else r - mean for r in row])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("group_size", [1, 2, 8])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_group_advantages_matches_loops(group_size, normalize_std):
    rewards = random_rewards(13, group_size, seed=group_size)
    got = group_advantages(rewards, normalize_std=normalize_std, eps=1e-6)
    torch.testing.assert_close(got, reference_group_advantages(rewards, normalize_std, 1e-6))


def test_group_advantages_hand_checked():
    # rewards 1,0,0,1: mean 0.5, unbiased std sqrt(1/3)
    got = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), eps=0.0)
    expected = 0.5 / math.sqrt(1 / 3)
    torch.testing.assert_close(got, torch.tensor([[expected, -expected, -expected, expected]]))
    torch.testing.assert_close(
        group_advantages(torch.tensor([[3.0, 1.0]]), normalize_std=False), torch.tensor([[1.0, -1.0]])
    )


def test_group_advantages_equal_rewards_and_single_response_give_zero():
    assert torch.equal(group_advantages(torch.ones(3, 4)), torch.zeros(3, 4))
    assert torch.equal(group_advantages(torch.tensor([[0.7], [0.2]])), torch.zeros(2, 1))


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.ones(8))
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.ones(2, 4, dtype=torch.long))


def test_task_normalized_advantages_matches_loops():
    rewards = random_rewards(11, 4, seed=3)
    task_ids = torch.tensor([0, 2, 2, 0, 1, 2, 0, 0, 1, 2, 2])
    eps = 1e-6
    expected = torch.empty_like(rewards)
    for g in range(len(rewards)):
        task_rewards = [r for h in range(len(rewards)) if task_ids[h] == task_ids[g] for r in rewards[h].tolist()]
        std = statistics.stdev(task_rewards)
        mean = sum(rewards[g].tolist()) / 4
        for i in range(4):
            expected[g, i] = (rewards[g, i] - mean) / (std + eps)
    torch.testing.assert_close(task_normalized_advantages(rewards, task_ids, eps), expected)


def test_task_normalized_advantages_single_task_uses_batch_std():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    std = statistics.stdev([1.0, 0.0, 1.0, 1.0])
    got = task_normalized_advantages(rewards, torch.zeros(2, dtype=torch.long), eps=0.0)
    torch.testing.assert_close(got, torch.tensor([[0.5 / std, -0.5 / std], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="task_ids"):
        task_normalized_advantages(rewards, torch.zeros(3, dtype=torch.long))


def test_broadcast_to_tokens_matches_loops():
    cu = random_cu_seqlens(17, seed=1)
    values = torch.randn(17, dtype=torch.float64)
    expected = [values[b].item() for b in range(17) for _ in range(int(cu[b + 1] - cu[b]))]
    got = broadcast_to_tokens(values, cu)
    assert got.shape == (int(cu[-1]),)
    assert got.tolist() == expected


def test_broadcast_to_tokens_edge_cases():
    assert broadcast_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([0, 0, 0])).numel() == 0
    assert broadcast_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([0, 2, 3])).tolist() == [1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="cu_seqlens"):
        broadcast_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        broadcast_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([0, 2]))


# --------------------------------------------------------------------------------------- aggregation


def reference_aggregate(loss, mask, cu, mode, global_tokens=None, global_seqs=None):
    per_seq_sum, per_seq_count = [], []
    for b in range(len(cu) - 1):
        s = n = 0.0
        for t in range(int(cu[b]), int(cu[b + 1])):
            if mask[t]:
                s += loss[t].item()
                n += 1
        per_seq_sum.append(s)
        per_seq_count.append(n)
    if mode == "token-mean":
        return sum(per_seq_sum) / max(global_tokens or sum(per_seq_count), 1)
    active = [b for b in range(len(per_seq_sum)) if per_seq_count[b] > 0]
    denominator = max(global_seqs or len(active), 1)
    if mode == "seq-mean-token-mean":
        return sum(per_seq_sum[b] / per_seq_count[b] for b in active) / denominator
    return sum(per_seq_sum[b] for b in active) / denominator


def aggregate_loss(loss, mask, cu, mode, global_num_tokens=None, global_num_seqs=None):
    """The trainer's reduction: ``aggregate_tokens`` over ``loss_normalizer``'s denominators (local counts
    unless global ones are given; a sequence without loss tokens does not count)."""
    mask = mask.bool()
    seq_tokens = segment_sum(mask.to(loss.dtype), cu)
    per_token = torch.repeat_interleave(seq_tokens, cu.diff())
    tokens = int(mask.sum()) if global_num_tokens is None else global_num_tokens
    seqs = int((seq_tokens > 0).sum()) if global_num_seqs is None else global_num_seqs
    return aggregate_tokens(loss, mask, loss_normalizer(mode, tokens, seqs, per_token))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("seed", [0, 1])
def test_aggregate_loss_matches_loops(mode, seed):
    cu = random_cu_seqlens(12, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.randn(int(cu[-1]), dtype=torch.float64, generator=gen)
    mask = torch.rand(int(cu[-1]), generator=gen) > 0.3
    got = aggregate_loss(loss, mask, cu, mode)
    torch.testing.assert_close(got, torch.tensor(reference_aggregate(loss, mask, cu, mode), dtype=torch.float64))
    # with global counts (as under data parallelism)
    got = aggregate_loss(loss, mask, cu, mode, global_num_tokens=100, global_num_seqs=30)
    expected = reference_aggregate(loss, mask, cu, mode, global_tokens=100, global_seqs=30)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregate_loss_shards_sum_to_whole_batch(mode):
    """Two ranks with global denominators add up to the single-rank loss."""
    cu = torch.tensor([0, 3, 7, 7, 12, 14])
    loss = torch.randn(14, dtype=torch.float64)
    mask = torch.tensor([0, 1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    whole = aggregate_loss(loss, mask, cu, mode)
    tokens, seqs = int(mask.sum()), 4  # sequence 2 is empty and does not count
    split = 7  # rank 0: sequences 0-1, rank 1: sequences 2-4
    rank0 = aggregate_loss(loss[:split], mask[:split], cu[:3], mode, tokens, seqs)
    rank1 = aggregate_loss(loss[split:], mask[split:], cu[2:] - split, mode, tokens, seqs)
    torch.testing.assert_close(rank0 + rank1, whole)


def test_aggregate_loss_hand_checked_and_empty_mask():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    mask = torch.tensor([1, 1, 1, 0])
    cu = torch.tensor([0, 1, 4])
    assert aggregate_loss(loss, mask, cu, "token-mean").item() == pytest.approx(2.0)  # (1+2+3)/3
    assert aggregate_loss(loss, mask, cu, "seq-mean-token-mean").item() == pytest.approx(1.75)  # (1 + 2.5)/2
    assert aggregate_loss(loss, mask, cu, "seq-mean-token-sum").item() == pytest.approx(3.0)  # (1 + 5)/2
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        empty = aggregate_loss(loss, torch.zeros(4, dtype=torch.bool), cu, mode)
        assert empty.item() == 0.0
        empty.backward()
        assert torch.equal(loss.grad, torch.zeros(4))
        loss.grad = None
    with pytest.raises(ValueError, match="mode"):
        loss_normalizer("sum", 3, 2, torch.ones(4))


def test_segment_sum_gradient():
    values = torch.randn(6, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 2, 2, 6])
    out = segment_sum(values, cu)
    torch.testing.assert_close(out, torch.stack([values[:2].sum(), values.new_zeros(()), values[2:].sum()]))
    (out * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    assert values.grad.tolist() == [1.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="values"):
        segment_sum(values[:5], cu)


# ------------------------------------------------------------------------------------------------ KL


def test_kl_estimators_match_formulas():
    logp = torch.randn(50, dtype=torch.float64) - 2
    ref = logp + 0.3 * torch.randn(50, dtype=torch.float64)
    for i in range(50):
        d = ref[i].item() - logp[i].item()
        assert kl_estimate(logp[i : i + 1], ref[i : i + 1], "k1").item() == pytest.approx(-d)
        assert kl_estimate(logp[i : i + 1], ref[i : i + 1], "k2").item() == pytest.approx(d * d / 2)
        assert kl_estimate(logp[i : i + 1], ref[i : i + 1], "k3").item() == pytest.approx(math.exp(d) - d - 1)
    assert bool((kl_estimate(logp, ref, "k3") >= 0).all())
    assert torch.equal(kl_estimate(logp, logp, "k3"), torch.zeros(50, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_kl_estimators_are_unbiased_for_categorical(seed):
    """k1 and k3 averaged over exact sampling probabilities equal the true KL, where k3's clamps do not act
    (|log ratio| < 2: every k3 term below its clamp of 10); a token the reference finds far less likely
    is capped at the clamp instead."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(7, dtype=torch.float64, generator=generator)
    p = torch.softmax(logits, 0)
    q = torch.softmax(logits + 0.6 * torch.rand(7, dtype=torch.float64, generator=generator), 0)
    assert (p.log() - q.log()).abs().max() < 2
    true_kl = (p * (p.log() - q.log())).sum()
    for estimator in ("k1", "k3"):
        expectation = (p * kl_estimate(p.log(), q.log(), estimator)).sum()
        torch.testing.assert_close(expectation, true_kl)
    far = kl_estimate(torch.tensor([-5.0, -1.0], dtype=torch.float64), torch.tensor([0.0, -0.5], dtype=torch.float64))
    assert far[0] == KL_CLAMP and far[1] == pytest.approx(math.expm1(0.5) - 0.5, rel=1e-12)
    with pytest.raises(ValueError, match="estimator"):
        kl_estimate(p, q, "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        kl_estimate(p, q[:3])


# ---------------------------------------------------------------------------------- dynamic sampling


def test_informative_groups_matches_loops():
    rewards = random_rewards(20, 4, seed=5)
    expected = [len(set(row)) > 1 for row in rewards.tolist()]
    assert informative_groups(rewards).tolist() == expected
    assert informative_groups(torch.tensor([[0.5], [1.0]])).tolist() == [False, False]
    assert informative_groups(torch.tensor([[0.5, 0.5 + 1e-9]]), atol=1e-6).tolist() == [False]


def test_group_collector_fills_batch_across_rounds():
    collector = GroupCollector(target_groups=3, max_rounds=5)
    assert collector.add(["a", "b", "c"], torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])) == 1
    assert not collector.done
    assert collector.add(["d", "e"], torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == 1
    assert collector.add(["f", "g"], torch.tensor([[0.0, 0.5], [1.0, 0.0]])) == 2
    assert collector.done and collector.full
    assert collector.batch() == ["b", "d", "f"]
    metrics = collector.metrics()
    assert metrics["dynamic_sampling/rounds"] == 3 and metrics["dynamic_sampling/groups_seen"] == 7
    with pytest.raises(ValueError, match="done"):
        collector.add(["h"], torch.tensor([[0.0, 1.0]]))


def test_group_collector_round_limit_and_disabled():
    collector = GroupCollector(target_groups=4, max_rounds=2)
    for _ in range(2):
        collector.add(["x", "y"], torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    assert collector.done and not collector.full and collector.batch() == ["y", "y"]
    plain = GroupCollector(target_groups=2, enabled=False)
    plain.add(["x", "y"], torch.ones(2, 4))
    assert plain.full and plain.batch() == ["x", "y"]
    with pytest.raises(ValueError, match="target_groups"):
        GroupCollector(target_groups=0)
    with pytest.raises(ValueError, match="rewards"):
        GroupCollector(target_groups=1).add(["x"], torch.ones(2, 2))


# ----------------------------------------------------------------------------------- overlong penalty


def test_overlong_penalty_matches_loop():
    max_len, buffer = 100, 20
    lengths = torch.arange(0, 121)
    expected = []
    for n in lengths.tolist():
        if n <= max_len - buffer:
            expected.append(0.0)
        elif n >= max_len:
            expected.append(-0.5)
        else:
            expected.append(-0.5 * (n - (max_len - buffer)) / buffer)
    torch.testing.assert_close(overlong_penalty(lengths, max_len, buffer, 0.5), torch.tensor(expected))


def test_overlong_penalty_demo_settings_and_edges():
    got = overlong_penalty(torch.tensor([9000, 9500, 10000]), 10000, 1000)
    torch.testing.assert_close(got, torch.tensor([0.0, -0.5, -1.0]))
    assert torch.equal(overlong_penalty(torch.tensor([5, 10]), 10, 0), torch.zeros(2))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), 10, 11)


# ------------------------------------------------------------------------------------------- metrics


def reference_pass_at_k(c, n, k):
    """Probability that k draws without replacement contain a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in d) for d in draws) / len(draws)


def test_pass_at_k_matches_enumeration():
    n = 6
    for k in range(1, n + 1):
        counts = torch.arange(0, n + 1)
        expected = torch.tensor([reference_pass_at_k(c, n, k) for c in range(n + 1)], dtype=torch.float64)
        torch.testing.assert_close(pass_at_k(counts, n, k), expected)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(torch.tensor([1]), 4, 5)
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(torch.tensor([5]), 4, 1)


def test_group_accuracy_metrics_hand_checked():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 0.9999, 0.0]])
    m = group_accuracy_metrics(rewards, ks=(1, 2))
    assert m["accuracy"] == pytest.approx(5 / 12)
    assert m["solve_all"] == pytest.approx(1 / 3) and m["solve_none"] == pytest.approx(1 / 3)
    assert m["pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)  # 1 - C(3,2)/C(4,2) = 0.5
    assert m["reward_mean"] == pytest.approx(rewards.double().mean().item())
    assert is_accurate(torch.tensor([1.0, 0.999, 1.0 + 1e-8])).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="rewards"):
        group_accuracy_metrics(torch.zeros(0, 4))
