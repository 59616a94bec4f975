"""Ulysses sequence parallelism on CPU: gloo groups of 2 and 4 processes started from pytest.

Every rank builds the same random packed batch from a shared seed, runs its shard through the
SP op and compares with the single-process op on the whole batch, computed in the same rank.
Process start-up dominates the cost, so each group runs many checks.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from helpers import spawn, tiny_causal_lm

from qwenlong.kernels.packing import build_cu_seqlens

# Sequences of varied length, including empty ones, that straddle shard boundaries for P = 2 and 4.
LENGTHS = [5, 0, 18, 1, 6, 4, 3]  # 37 tokens, padded to 38 (P=2) and 40 (P=4); the 18 spans 2-3 shards
FP32 = {"rtol": 1e-5, "atol": 1e-6}
# What the ranks' fork server imports once: the SP integration (which imports the kernels) and this module.
PRELOAD = ["transformers", "qwenlong.integrations.hf_sequence_parallel", __name__]


def _assert_close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"rank {dist.get_rank()}: {what}: {m}", **(tol or FP32))


# --- sharding -------------------------------------------------------------------------------------------------


def _check_sharding(group, lengths=LENGTHS):
    """Contiguous equal shards that reassemble the batch; padding is its own ignored sequence."""
    from qwenlong.kernels import gather_per_token, shard_packed_batch

    world = dist.get_world_size(group)
    cu = build_cu_seqlens(lengths)
    total = int(cu[-1])
    num_pad = -total % world
    gen = torch.Generator().manual_seed(0)  # the same batch on every rank
    batch = {"labels": torch.randint(0, 9, (total,), generator=gen),
             "position_ids": torch.cat([torch.arange(n) for n in lengths]),
             "mask": torch.rand(total, generator=gen) > 0.5, "hidden": torch.randn(total, 3, generator=gen)}
    shard = shard_packed_batch(cu, group, **batch)
    expected_pad = {"labels": torch.full((num_pad,), -100), "position_ids": torch.arange(num_pad),
                    "mask": torch.zeros(num_pad, dtype=torch.bool), "hidden": torch.zeros(num_pad, 3)}
    for name, tensor in batch.items():
        assert shard[name].shape == ((total + num_pad) // world, *tensor.shape[1:]), name
        everything = gather_per_token(shard[name], group)
        assert torch.equal(everything, torch.cat([tensor, expected_pad[name]])), name
        assert torch.equal(gather_per_token(shard[name], group, num_tokens=total), tensor), name
    expected_cu = cu.tolist() + ([total + num_pad] if num_pad else [])
    assert shard.cu_seqlens.tolist() == expected_cu and shard.max_seqlen == max(*lengths, num_pad)
    with pytest.raises(ValueError, match="mask.shape"):
        shard_packed_batch(cu, group, labels=batch["labels"], mask=batch["mask"][1:])


# --- attention ------------------------------------------------------------------------------------------------


def _check_attention(group, heads: int, kv_heads: int, seed: int, causal=True, window_size=(-1, -1), head_dim=8,
                     dtype=torch.float32):
    """Outputs, LSE and q/k/v gradients of ulysses_attention equal varlen_attention on the whole batch.

    The padding added by sharding gets random upstream gradients: if it attended real tokens, they would leak.
    """
    from qwenlong.kernels import shard_packed_batch, ulysses_attention
    from qwenlong.kernels.attention import varlen_attention

    gen = torch.Generator().manual_seed(seed)
    cu = build_cu_seqlens(LENGTHS)
    total, max_seqlen = int(cu[-1]), max(LENGTHS)
    q = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    k, v = (torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    grad_out = torch.randn(total, heads, head_dim, generator=gen).to(dtype)
    tol = FP32 if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = varlen_attention(*full, cu, cu, max_seqlen, max_seqlen, causal=causal, window_size=window_size,
                                        return_lse=True)
    ref_out.backward(grad_out)

    shard = shard_packed_batch(cu, group, q=q, k=k, v=v, grad_out=grad_out)
    rows = shard.local_slice
    real = slice(0, max(0, min(rows.stop, total) - rows.start))  # this rank's rows that are real tokens
    local = [shard[name].clone().requires_grad_() for name in ("q", "k", "v")]
    out, lse = ulysses_attention(*local, shard.cu_seqlens, shard.max_seqlen, group, causal=causal,
                                 window_size=window_size, return_lse=True)
    local_grad_out = shard["grad_out"].clone()
    local_grad_out[real.stop :] = torch.randn(local_grad_out[real.stop :].shape, generator=gen).to(dtype)
    out.backward(local_grad_out)
    what = f"heads={heads}/{kv_heads} P={dist.get_world_size(group)} causal={causal} window={window_size} {dtype}"
    assert out.shape == local[0].shape and lse.shape == (heads, local[0].shape[0])
    _assert_close(out[real], ref_out.detach()[rows][real], f"out {what}", **tol)
    _assert_close(lse[:, real], ref_lse[:, rows][:, real], f"lse {what}")
    for name, mine, ref in zip("qkv", local, full, strict=True):
        _assert_close(mine.grad[real], ref.grad[rows][real], f"d{name} {what}", **tol)


def _check_head_errors(group):
    from qwenlong.kernels import ulysses_attention

    world = dist.get_world_size(group)
    heads = world + 1
    cu = build_cu_seqlens([2 * world])
    q = torch.randn(2, heads, 8)
    with pytest.raises(ValueError, match=rf"\({heads}\).*\({world}\)"):
        ulysses_attention(q, q, q, cu, 2 * world, group)
    q = torch.randn(2, 2 * world, 8)
    with pytest.raises(ValueError, match="cu_seqlens"):  # the local total, not the whole batch's
        ulysses_attention(q, q, q, build_cu_seqlens([2]), 2, group)


# --- log-probs and loss ---------------------------------------------------------------------------------------


def _lm_batch(seed: int, hidden_size: int = 16, vocab: int = 50):
    """A packed batch with final hidden states, LM-head weight and GRPO inputs (whole batch, every rank)."""
    from qwenlong.kernels import next_token_labels

    gen = torch.Generator().manual_seed(seed)
    cu = build_cu_seqlens(LENGTHS)
    total = int(cu[-1])
    input_ids = torch.randint(0, vocab, (total,), generator=gen)
    labels = next_token_labels(input_ids, cu)
    per_sequence_adv = torch.randn(len(LENGTHS), generator=gen)
    batch = {
        "input_ids": input_ids,
        "position_ids": torch.cat([torch.arange(n) for n in LENGTHS]),
        "hidden": torch.randn(total, hidden_size, generator=gen),
        "labels": labels,
        "advantages": per_sequence_adv.repeat_interleave(torch.tensor(LENGTHS)),
        "old_logprobs": -torch.rand(total, generator=gen) * 4,
        "ref_logprobs": -torch.rand(total, generator=gen) * 4,
        "mask": (torch.rand(total, generator=gen) > 0.2) & (labels != -100),
    }
    return cu, batch, torch.randn(vocab, hidden_size, generator=gen) * 0.3


def _sequences_of_dp_rank(cu, batch, dp_group):
    """Contiguous sequences of this data-parallel rank, repacked; and their rows in the whole batch."""
    dp_size = 1 if dp_group is None else dp_group.size()
    dp_rank = 0 if dp_group is None else dp_group.rank()
    bounds = torch.linspace(0, len(LENGTHS), dp_size + 1).round().long().tolist()
    first, last = bounds[dp_rank], bounds[dp_rank + 1]
    rows = slice(int(cu[first]), int(cu[last]))
    return build_cu_seqlens(LENGTHS[first:last]), {name: t[rows] for name, t in batch.items()}, rows


def _check_sp_logprobs_and_loss(sp_group, dp_group, seed: int):
    """SP x DP log-probs/entropy are bitwise the single-process ones; loss and gradients agree to fp32 rounding."""
    from qwenlong.kernels import shard_packed_batch, sp_grpo_loss, sp_linear_logprobs
    from qwenlong.kernels.logprobs import grpo_loss, linear_logprobs

    options = {"clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.05, "entropy_coef": 0.01}
    cu, batch, weight = _lm_batch(seed)
    what = f"SP={dist.get_world_size(sp_group)} DP={1 if dp_group is None else dp_group.size()}"

    ref_hidden, ref_weight = batch["hidden"].clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logp, ref_entropy = linear_logprobs(ref_hidden, ref_weight, batch["labels"], return_entropy=True)

    my_cu, mine, rows = _sequences_of_dp_rank(cu, batch, dp_group)
    shard = shard_packed_batch(my_cu, sp_group, **mine)
    real = slice(0, max(0, min(shard.local_slice.stop, shard.num_tokens) - shard.local_slice.start))
    hidden, my_weight = shard["hidden"].clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = sp_linear_logprobs(hidden, my_weight, shard["labels"], sp_group, num_tokens=shard.num_tokens,
                                       return_entropy=True)
    assert torch.equal(logp, ref_logp.detach()[rows]), f"{what}: log-probs differ from SP 1"
    assert torch.equal(entropy, ref_entropy.detach()[rows]), f"{what}: entropies differ from SP 1"
    # the gathered log-probs are replicated: back-propagating one function of them gives each rank its rows' grads
    coefficients = torch.randn(len(LENGTHS), generator=torch.Generator().manual_seed(seed))
    per_token = coefficients.repeat_interleave(torch.tensor(LENGTHS))
    (logp * per_token[rows]).sum().backward()
    (ref_logp * per_token).sum().backward()
    _assert_close(hidden.grad[real], ref_hidden.grad[rows][shard.local_slice][real],
                  f"d hidden of gathered log-probs {what}")
    hidden.grad, ref_hidden.grad, my_weight.grad, ref_weight.grad = None, None, None, None

    ref_loss, ref_metrics = grpo_loss(ref_hidden, ref_weight, batch["labels"], batch["advantages"],
                                      batch["old_logprobs"], batch["mask"], ref_logprobs=batch["ref_logprobs"],
                                      **options)
    loss, metrics = sp_grpo_loss(hidden, my_weight, shard["labels"], shard["advantages"], shard["old_logprobs"],
                                 shard["mask"], ref_logprobs=shard["ref_logprobs"], sp_group=sp_group,
                                 dp_group=dp_group, **options)
    loss.backward()
    ref_loss.backward()
    _assert_close(loss, ref_loss.detach(), f"loss {what}")
    assert sorted(metrics) == sorted(ref_metrics)
    for name in metrics:
        _assert_close(metrics[name], ref_metrics[name], f"metric {name} {what}")

    ref_rows = ref_hidden.grad[rows][shard.local_slice][real]
    _assert_close(hidden.grad[real], ref_rows, f"d hidden {what}")
    assert torch.all(hidden.grad[real.stop :] == 0), f"{what}: padding rows got a gradient"
    dist.all_reduce(my_weight.grad)  # partial on each rank: sum over SP x DP (the whole world here)
    _assert_close(my_weight.grad, ref_weight.grad, f"d weight {what}")


# --- a Hugging Face model ------------------------------------------------------------------------------------


def _check_hf_model(group, family: str = "qwen2", gradient_checkpointing: bool = False, seed: int = 10):
    """A tiny HF causal LM under SP gives the log-probs and gradients of the plain model run sequence by sequence."""
    from qwenlong.integrations.hf_sequence_parallel import SequenceParallelCausalLM
    from qwenlong.kernels import shard_packed_batch, sp_grpo_loss, sp_linear_logprobs
    from qwenlong.kernels.logprobs import grpo_loss, linear_logprobs

    # initializer_range 0.2 (not 0.02): sharp attention, so a wrong position or a missed key changes the output
    reference = tiny_causal_lm(family, seed=seed, vocab_size=50, initializer_range=0.2, attention="eager")
    sp_model = SequenceParallelCausalLM(copy.deepcopy(reference), group)
    if gradient_checkpointing:  # layers recomputed in backward: the all-to-alls run again, in the same order
        sp_model.model.gradient_checkpointing_enable()
    cu, batch, _ = _lm_batch(seed, hidden_size=32, vocab=50)
    loss_inputs = ("labels", "advantages", "old_logprobs", "mask")
    what = f"{family} SP={dist.get_world_size(group)} checkpointing={gradient_checkpointing}"

    ref_hidden = torch.cat([
        reference.model(input_ids=batch["input_ids"][None, s:e], position_ids=batch["position_ids"][None, s:e])
        .last_hidden_state[0]
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True) if e > s
    ])
    ref_weight = reference.get_output_embeddings().weight
    ref_logp = linear_logprobs(ref_hidden.detach(), ref_weight.detach(), batch["labels"])
    ref_loss, _ = grpo_loss(ref_hidden, ref_weight, *(batch[name] for name in loss_inputs))
    ref_loss.backward()

    shard = shard_packed_batch(cu, group, **{name: batch[name] for name in ("input_ids", "position_ids", *loss_inputs)})
    hidden = sp_model(shard["input_ids"], shard["position_ids"], shard.cu_seqlens, shard.max_seqlen)
    assert hidden.shape == (shard.local_tokens, reference.config.hidden_size)
    logp = sp_linear_logprobs(hidden, sp_model.lm_head_weight, shard["labels"], group, num_tokens=shard.num_tokens)
    _assert_close(logp, ref_logp, f"log-probs {what}", rtol=1e-5, atol=1e-5)
    loss, _ = sp_grpo_loss(hidden, sp_model.lm_head_weight, *(shard[name] for name in loss_inputs), sp_group=group)
    loss.backward()
    _assert_close(loss, ref_loss.detach(), f"loss {what}", rtol=1e-5, atol=1e-6)
    for (name, ref_param), param in zip(reference.named_parameters(), sp_model.model.parameters(), strict=True):
        dist.all_reduce(param.grad, group=group)  # partial per rank: sum over the SP group
        _assert_close(param.grad, ref_param.grad, f"d {name} {what}", rtol=1e-4, atol=1e-6)


# --- failures: bounded time, clear error ----------------------------------------------------------------------


def _check_missing_peer_times_out():
    """A rank that never joins the all-to-all makes the others raise within the group timeout."""
    from qwenlong.kernels import ulysses_attention

    group = dist.new_group([0, 1], timeout=timedelta(seconds=2))
    if dist.get_rank() == 0:
        q = torch.randn(4, 2, 8)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="sequence-parallel all_to_all over 2 ranks failed"):
            ulysses_attention(q, q, q, build_cu_seqlens([8]), 8, group)
        assert time.monotonic() - start < 20
    dist.barrier()


def _check_dead_peer_raises():
    """A rank that exits makes the others' next collective raise at once (the last check of a group)."""
    from qwenlong.kernels import ulysses_attention

    group = dist.new_group([0, 1], timeout=timedelta(seconds=30))
    dist.barrier()
    if dist.get_rank() == 1:
        os._exit(0)
    q = torch.randn(4, 2, 8)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="sequence-parallel all_to_all over 2 ranks failed"):
        ulysses_attention(q, q, q, build_cu_seqlens([8]), 8, group)
    assert time.monotonic() - start < 20


# --- workers ----------------------------------------------------------------------------------------------------


def _two_ranks():
    from qwenlong.kernels import new_sequence_parallel_groups

    world = dist.group.WORLD
    _check_sharding(world)
    _check_attention(world, heads=4, kv_heads=4, seed=1)
    _check_attention(world, heads=4, kv_heads=1, seed=2, causal=False)  # GQA, kv_heads < P: KV heads repeated
    _check_attention(world, heads=6, kv_heads=3, seed=3, window_size=(4, 0))  # P does not divide kv_heads
    _check_head_errors(world)
    _check_sp_logprobs_and_loss(world, None, seed=4)  # SP 2
    sp_group, dp_group = new_sequence_parallel_groups(1)
    _check_sp_logprobs_and_loss(sp_group, dp_group, seed=5)  # SP 1 x DP 2
    _check_hf_model(world, "qwen3")
    _check_hf_model(world, "llama", gradient_checkpointing=True)
    _check_missing_peer_times_out()
    _check_dead_peer_raises()


def _four_ranks():
    from qwenlong.kernels import new_sequence_parallel_groups

    world = dist.group.WORLD
    with pytest.raises(ValueError, match="sp_size must divide the world size 4, got 3"):
        new_sequence_parallel_groups(3)
    _check_sharding(world)
    _check_sharding(world, lengths=[1, 0])  # fewer tokens than ranks: the padding spans three ranks
    _check_attention(world, heads=8, kv_heads=2, seed=6)  # GQA, kv_heads < P
    _check_head_errors(world)
    _check_sp_logprobs_and_loss(world, None, seed=7)  # SP 4
    sp_group, dp_group = new_sequence_parallel_groups(2)
    _check_attention(sp_group, heads=4, kv_heads=2, seed=8, dtype=torch.bfloat16)
    _check_sp_logprobs_and_loss(sp_group, dp_group, seed=9)  # SP 2 x DP 2
    _check_hf_model(world)  # Qwen2, SP 4
    _check_hf_model(sp_group)  # Qwen2, SP 2 (both pairs run the whole batch)


def test_next_token_labels_stay_inside_sequences():
    from qwenlong.kernels import next_token_labels

    input_ids = torch.randint(0, 1000, (sum(LENGTHS),))
    cu = build_cu_seqlens(LENGTHS)
    expected = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        expected += input_ids[start + 1 : end].tolist() + ([-7] if end > start else [])
    assert next_token_labels(input_ids, cu, ignore_index=-7).tolist() == expected


def test_single_process_is_a_group_of_one(monkeypatch):
    """Without torch.distributed the SP ops are the plain ops: same outputs, bitwise."""
    from qwenlong.kernels import shard_packed_batch, sp_grpo_loss, sp_linear_logprobs, ulysses_attention
    from qwenlong.kernels.attention import varlen_attention
    from qwenlong.kernels.logprobs import grpo_loss, linear_logprobs
    from qwenlong.kernels.sequence_parallel.shard import pad_cu_seqlens

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    assert not dist.is_initialized()
    cu, batch, weight = _lm_batch(seed=11)
    shard = shard_packed_batch(cu, **batch)
    assert shard.num_pad == 0 and all(torch.equal(shard[name], batch[name]) for name in batch)
    q, k, v = torch.randn(3, int(cu[-1]), 4, 8).unbind()
    assert torch.equal(ulysses_attention(q, k, v, cu, max(LENGTHS)), varlen_attention(q, k, v, cu, cu, max(LENGTHS),
                                                                                        max(LENGTHS)))
    assert torch.equal(sp_linear_logprobs(batch["hidden"], weight, batch["labels"]),
                       linear_logprobs(batch["hidden"], weight, batch["labels"]))
    inputs = [batch[name] for name in ("labels", "advantages", "old_logprobs", "mask")]
    loss, _ = sp_grpo_loss(batch["hidden"], weight, *inputs)
    assert torch.equal(loss, grpo_loss(batch["hidden"], weight, *inputs)[0])
    with pytest.raises(ValueError, match="num_tokens"):
        sp_grpo_loss(batch["hidden"], weight, *inputs, num_tokens=5)
    # mistakes are named, not IndexError / AttributeError / ZeroDivisionError
    with pytest.raises(ValueError, match="labels must have the packed tokens on dim 0"):
        shard_packed_batch(cu, labels=torch.tensor(3))
    with pytest.raises(ValueError, match="input_ids must be a torch.Tensor, got list"):
        shard_packed_batch(cu, input_ids=[1, 2, 3])
    with pytest.raises(ValueError, match=r"multiple of kv_heads \(0\)"):
        ulysses_attention(q, k[:, :0], v[:, :0], cu, max(LENGTHS))
    with pytest.raises(ValueError, match="multiple must be an int >= 1, got 0"):
        pad_cu_seqlens(cu, 0)


def test_ulysses_reads_cu_seqlens_on_a_gpu_only_under_the_check_flag(monkeypatch):
    """On a GPU a read of cu_seqlens waits for the device: Ulysses attention leaves it to varlen_attention's
    plan (read once per batch), unless QWENLONG_CHECK_TENSORS=1; it ran once per layer and call."""
    from qwenlong.kernels import ulysses_attention
    from qwenlong.kernels.sequence_parallel import ulysses

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = torch.randn(3, 12, 2, 8).unbind()
    reads = []
    monkeypatch.setattr(ulysses, "check_cu_seqlens", lambda *args: reads.append(args))
    monkeypatch.setattr(ulysses, "tensor_checks_enabled", lambda tensor: False)  # as a GPU tensor
    for _ in range(3):
        ulysses_attention(q, k, v, cu, 7)
    assert reads == []
    monkeypatch.setattr(ulysses, "tensor_checks_enabled", lambda tensor: True)  # CPU, or the flag on a GPU
    ulysses_attention(q, k, v, cu, 7)
    assert len(reads) == 1


@pytest.mark.distributed
def test_sequence_parallel_two_ranks(free_port):
    spawn(_two_ranks, 2, free_port, preload=PRELOAD)


@pytest.mark.distributed
def test_sequence_parallel_four_ranks(free_port):
    spawn(_four_ranks, 4, free_port, preload=PRELOAD)


@pytest.mark.parametrize("num_tokens", [-2, 38, 2.5, True])
def test_sp_logprobs_num_tokens_must_fit_the_gathered_tokens(num_tokens, monkeypatch):
    """``num_tokens`` cuts the gathered log-probs to the real tokens: an int in [0, gathered]. -2 dropped the last
    two tokens and 38 (of 37 gathered, a group of one) returned 37 without a word; both now a ValueError naming
    it. The bounds themselves are kept."""
    from qwenlong.kernels import gather_per_token, sp_linear_logprobs

    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    _, batch, weight = _lm_batch(seed=12)
    total = batch["labels"].shape[0]
    assert total == 37
    with pytest.raises(ValueError, match=r"num_tokens must be an int in \[0, 37\]"):
        sp_linear_logprobs(batch["hidden"], weight, batch["labels"], num_tokens=num_tokens, return_entropy=True)
    with pytest.raises(ValueError, match="num_tokens"):
        gather_per_token(batch["labels"], num_tokens=num_tokens)
    for count in (0, total):
        assert sp_linear_logprobs(batch["hidden"], weight, batch["labels"], num_tokens=count).shape == (count,)


def test_context_sum_reduces_on_the_context_device(monkeypatch):
    """``DistributedContext.sum`` built its tensor on the CPU whatever the context's device, and NCCL serves CUDA
    tensors only ("No backend type associated with device type cpu"): every multi-GPU step died at its first
    metrics sum. The reduce must run on ``ctx.device``. A fake collective that, like NCCL, takes one device
    type (meta here, as this test needs no GPU) stops the call once it has seen the tensor."""
    from qwenlong.distributed import context

    class Reduced(Exception):
        pass

    device = torch.device("meta")

    def one_device_all_reduce(tensor, *args, **kwargs):
        if tensor.device != device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        raise Reduced

    monkeypatch.setattr(context.dist, "all_reduce", one_device_all_reduce)
    ctx = context.DistributedContext(rank=0, world_size=2, device=device)
    with pytest.raises(Reduced):
        ctx.sum({"loss": 1.5, "tokens": 7.0})


def test_token_gather_runs_on_a_torch_without_all_gather_single(monkeypatch):
    """``all_gather_single`` is torch 2.13's name for ``all_gather_into_tensor``; the package supports torch 2.8 on,
    where only the old name exists (every SP step raised AttributeError there). A one-process gloo group runs the
    gather both ways, and the gradient keeps the rank's own slice."""
    from qwenlong.kernels.sequence_parallel.comm import _AllGatherTokens

    with one_process_group():
        for drop_new_name in (False, True):
            if drop_new_name:
                monkeypatch.delattr(dist, "all_gather_single", raising=False)
            assert_identity_collective(lambda x: _AllGatherTokens.apply(x, None), (5, 3))


def test_all_to_all_runs_where_gloo_has_no_list_form(monkeypatch):
    """gloo gained the list-form ``all_to_all`` in torch 2.12 (older ones raise 'Backend gloo does not support
    alltoall'; the package supports 2.8 on): the exchange goes through ``all_to_all_single``. A one-process gloo
    group runs it, forward and backward, with the list form made to fail as old gloo does."""
    from qwenlong.kernels.sequence_parallel.comm import _AllToAll

    def old_gloo(*args, **kwargs):
        raise RuntimeError("Backend gloo does not support alltoall")

    with one_process_group():
        monkeypatch.setattr(dist, "all_to_all", old_gloo)
        assert_identity_collective(lambda x: _AllToAll.apply(x, None, 1, 0), (6, 4, 3))  # every chunk comes back


@contextlib.contextmanager
def one_process_group():
    """A gloo group of this process alone (its collectives run, a rank's share is the whole), destroyed after."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def assert_identity_collective(collective, shape) -> None:
    """On one rank a collective gives its input back, and its backward the incoming gradient."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = collective(x)
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
