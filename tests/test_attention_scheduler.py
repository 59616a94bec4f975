"""varlen_attention's tile scheduler and its size limits: one program per useful tile, heaviest first,
a tile table read once per batch, any number of sequences, 64-bit addressing (huge strides), windows
up to the int32 limit and beyond, argument checks, and flash-attn's head-size padding.

Ground truths: a brute-force count from the float64 reference's mask, the float64 reference
itself, and the same call on plain contiguous inputs (the kernels compute a tile the same way
whatever the strides or the batch around it, so those must agree bit for bit).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_attention import _check_accuracy, _cu, _inputs, _run

from qwenlong.kernels.attention import attention_reference, flash_attn_varlen_func, varlen_attention
from qwenlong.kernels.attention import varlen as varlen_module
from qwenlong.kernels.attention.reference import block_diagonal_mask


def _brute_force_weights(lens_q, lens_k, block, other_block, window, over_keys):
    """{(seq, block): number of other-axis blocks holding an allowed (query, key) pair}, from the mask."""
    weights = {}
    for seq, (q_len, k_len) in enumerate(zip(lens_q, lens_k, strict=True)):
        mask = block_diagonal_mask(_cu([q_len]), _cu([k_len]), causal=False, window_size=window)
        if over_keys:
            mask = mask.T
        for b in range(math.ceil(mask.shape[0] / block)):
            rows = mask[b * block : (b + 1) * block]
            hit = rows.any(0).nonzero().flatten() // other_block
            weights[seq, b] = len(set(hit.tolist()))
    return weights


@pytest.mark.parametrize("over_keys", [False, True], ids=["query-tiles", "key-tiles"])
@pytest.mark.parametrize("seed", range(4))
def test_schedule_lists_every_tile_once_heaviest_first(seed, over_keys):
    rng = np.random.default_rng(seed)
    batch = int(rng.integers(1, 7))
    lens_q = [int(rng.choice([0, 1, rng.integers(2, 300)])) for _ in range(batch)]
    lens_k = [max(0, n + int(rng.integers(-30, 60))) for n in lens_q] if seed % 2 else lens_q
    left, right = (int(rng.integers(0, 80)), int(rng.integers(0, 80))) if seed >= 2 else (10**6, 0)
    block, other_block = (32, 16) if over_keys else (64, 32)

    table = varlen_module.schedule(lens_q, lens_k, block, other_block, (left, right), over_keys)
    truth = _brute_force_weights(lens_q, lens_k, block, other_block, (left, right), over_keys)
    assert table.dtype == np.int32 and table.shape == (2, len(truth))
    tiles = [tuple(t) for t in table.T.tolist()]
    assert sorted(tiles) == sorted(truth), "every (sequence, block) exactly once"
    weights = [truth[t] for t in tiles]
    assert weights == sorted(weights, reverse=True), "heaviest tiles first"


class _LaunchSpy:
    """Records the grids a kernel is launched with (and its ATOMIC_DQ flag, if given), and launches it."""

    def __init__(self, kernel):
        self.kernel, self.grids, self.atomic_dq = kernel, [], []

    def __getitem__(self, grid):
        self.grids.append(grid)

        def launch(*args, **kwargs):
            if "ATOMIC_DQ" in kwargs:
                self.atomic_dq.append(kwargs["ATOMIC_DQ"])
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spy_kernels(monkeypatch) -> dict[str, _LaunchSpy]:
    spies = {}
    for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        spies[name] = _LaunchSpy(getattr(varlen_module, name))
        monkeypatch.setattr(varlen_module, name, spies[name])
    return spies


def test_programs_launched_equal_useful_tiles(device, monkeypatch):
    """A long document beside short ones: one program per (block, head) of each, none for the longest's shadow."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    spies = _spy_kernels(monkeypatch)
    lens = [300, 5, 1, 0, 17, 70]
    heads, kv_heads, head_dim = 4, 2, 64
    q, k, v, do, cu, _ = _inputs(lens, lens, heads, kv_heads, head_dim, torch.float16, device, seed=1)
    _run(q, k, v, do, cu, cu, True, (-1, -1))
    cfg = varlen_module._configs(head_dim, torch.float16, varlen_module.tile_table(q.device))

    def tiles(block):
        return sum(math.ceil(n / block) for n in lens)

    assert spies["_attn_fwd"].grids == [(tiles(cfg["fwd"]["BLOCK_M"]) * heads,)]
    assert spies["_attn_bwd_dkdv"].grids == [(tiles(cfg["dkdv"]["BLOCK_N"]) * kv_heads,)]
    assert spies["_attn_bwd_dq"].grids == [(tiles(cfg["dq"]["BLOCK_M"]) * heads,)]
    old_grid = math.ceil(max(lens) / cfg["fwd"]["BLOCK_M"]) * heads * len(lens)  # (max blocks, heads, batch)
    assert spies["_attn_fwd"].grids[0][0] < old_grid


def _backward_launches(monkeypatch, call, lens, device) -> dict[str, list]:
    """Run ``call(q, k, v, cu, max_seqlen)`` forward and backward (4/2 heads, d64, fp16); the backward
    kernels' grids and ATOMIC_DQ flags."""
    spies = _spy_kernels(monkeypatch)
    q, k, v, do, cu, _ = _inputs(lens, lens, 4, 2, 64, torch.float16, device, seed=11)
    torch.autograd.grad(call(q, k, v, cu, max(lens)), (q, k, v), do)
    dkdv, dq = spies["_attn_bwd_dkdv"], spies["_attn_bwd_dq"]
    return {"dkdv": dkdv.grids, "atomic_dq": dkdv.atomic_dq, "dq": dq.grids}


def test_deterministic_flag_chooses_the_backward_kernels(device, monkeypatch):
    """deterministic=False launches the dk/dv kernel with atomic dq, on its own tiles, and no dq kernel; the
    default (and flash_attn_varlen_func's default) launches both; torch's global deterministic switch wins."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    cfg = varlen_module._configs(64, torch.float16, varlen_module.tile_table(torch.device(device)))
    lens = [90, 3, 0, 41]

    def grid(kernel, block, heads):
        return [(sum(math.ceil(n / cfg[kernel][block]) for n in lens) * heads,)]

    def ours(deterministic=None):
        flags = {} if deterministic is None else {"deterministic": deterministic}
        return lambda q, k, v, cu, m: varlen_attention(q, k, v, cu, cu, m, m, **flags)

    def flash(deterministic=None):
        flags = {} if deterministic is None else {"deterministic": deterministic}
        return lambda q, k, v, cu, m: flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True, **flags)

    deterministic = {"dkdv": grid("dkdv", "BLOCK_N", 2), "atomic_dq": [False], "dq": grid("dq", "BLOCK_M", 4)}
    atomic = {"dkdv": grid("dkdv_atomic", "BLOCK_N", 2), "atomic_dq": [True], "dq": []}

    def launches(call):
        return _backward_launches(monkeypatch, call, lens, device)

    assert launches(ours()) == deterministic
    assert launches(ours(False)) == atomic
    assert launches(flash()) == deterministic
    assert launches(flash(True)) == deterministic
    assert launches(flash(False)) == atomic
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert launches(ours(False)) == deterministic
    finally:
        torch.use_deterministic_algorithms(False)


def test_more_sequences_than_a_grid_axis_holds(device, monkeypatch):
    """70,000 sequences (most empty): the sequences past index 65,535 are computed, bitwise as when packed alone."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    lens = [40, 0, 9] + [0] * 69_990 + [33, 1, 0, 70, 2, 0, 12]
    dense = [n for n in lens if n]
    heads, kv_heads, head_dim, dtype = 2, 1, 32, torch.bfloat16
    q, k, v, do, cu, _ = _inputs(lens, lens, heads, kv_heads, head_dim, dtype, device, seed=4)
    spies = _spy_kernels(monkeypatch)
    many = _run(q, k, v, do, cu, cu, True, (-1, -1))
    table = varlen_module.batch_plan(cu, cu, q.shape[0], k.shape[0]).tiles(
        *(varlen_module._configs(head_dim, dtype, 80)["fwd"][b] for b in ("BLOCK_M", "BLOCK_N")),
        varlen_module.batch_plan(cu, cu, q.shape[0], k.shape[0]).window(-1, 0), False, q.device)  # fmt: skip
    assert int(table[0].max()) > 65_535
    assert spies["_attn_fwd"].grids[0][0] == table.shape[1] * heads

    cu_dense = _cu(dense).to(device)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    few = _run(*leaves, do, cu_dense, cu_dense, True, (-1, -1))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), many, few, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    "causal,window",
    [(False, (2**31 - 5, 2**31 - 5)), (True, (2**31 - 1, 0)), (False, (2**40, 3)), (False, (7, 2**31))],
)
def test_windows_at_and_past_the_int32_limit(backend, causal, window, device, monkeypatch):
    """A window side near or past 2**31 sees as far as an unbounded one (the kernels once overflowed int32)."""
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    _check_accuracy([70, 1, 130], [90, 1, 130], 2, 1, 64, torch.float16, causal, window, device, seed=8)
    q, k, v, do, cu_q, cu_k = _inputs([70, 130], [90, 130], 2, 1, 64, torch.float16, device, seed=9)
    unbounded = tuple(-1 if side >= 2**31 - 5 else side for side in window)
    huge = _run(q, k, v, do, cu_q, cu_k, causal, window)
    plain = _run(q, k, v, do, cu_q, cu_k, causal, unbounded)
    for a, b in zip(huge, plain, strict=True):
        assert torch.equal(a, b)


def _strided_copy(x: torch.Tensor, strides: tuple[int, int]) -> torch.Tensor:
    """``x`` (T, H, d) copied into a view with the given token and head strides, in a lazily allocated
    buffer: only the pages the view touches are ever backed by memory."""
    tokens, heads, dim = x.shape
    size = (tokens - 1) * strides[0] + (heads - 1) * strides[1] + dim
    view = torch.empty(size, dtype=x.dtype, device=x.device).as_strided(x.shape, (*strides, 1))
    return view.copy_(x)


@pytest.mark.parametrize(
    "q_strides,kv_strides",
    [
        ((32, 2**30), None),  # transformers' (batch, heads, T, d) layout: head offsets past 2**31 elements
        ((2**22 + 96, 32), (2**22 + 96, 32)),  # a fused-qkv slice: token offsets past 2**31 inside the sequence
        ((2**23 + 32, 32), None),  # a token stride past MAX_TOKEN_STRIDE: copied first
    ],
    ids=["head-stride-2^30", "token-stride-2^22", "token-stride-2^23"],
)
def test_views_with_huge_strides(q_strides, kv_strides, device, monkeypatch):
    """Bitwise the same outputs and gradients as on contiguous copies of the same inputs."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    lens = [3, 520] if q_strides[0] < 2**23 else [3, 17]
    heads, kv_heads, head_dim = 3, 1, 32
    q, k, v, do, cu, _ = _inputs(lens, lens, heads, kv_heads, head_dim, torch.float16, device, seed=6)
    dense = _run(q, k, v, do, cu, cu, True, (-1, -1))
    views = [_strided_copy(q.detach(), q_strides).requires_grad_()]
    for t in (k, v):
        views.append((_strided_copy(t.detach(), kv_strides) if kv_strides else t.detach().clone()).requires_grad_())
    assert views[0].stride()[:2] == q_strides
    strided = _run(*views, do, cu, cu, True, (-1, -1))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), strided, dense, strict=True):
        assert torch.equal(a, b), name


def _count_reads(monkeypatch) -> list:
    reads = []
    read = varlen_module._read_lengths

    def counted(name, cu_seqlens, total):
        reads.append(name)
        return read(name, cu_seqlens, total)

    monkeypatch.setattr(varlen_module, "_read_lengths", counted)
    return reads


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cu_seqlens_are_read_once_per_batch(backend, device, monkeypatch):
    """Layers sharing cu_seqlens tensors read them once; an in-place edit is noticed (and validated)."""
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    reads = _count_reads(monkeypatch)
    q, k, v, do, cu, _ = _inputs([20, 50, 30], [20, 50, 30], 2, 1, 64, torch.float32, device, seed=2)
    first = _run(q, k, v, do, cu, cu, True, (-1, -1))
    second = _run(q, k, v, do, cu, cu, True, (-1, -1))
    assert reads == ["cu_seqlens_q"], "the second call (forward and backward) must reuse the plan"
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)

    cu.copy_(_cu([60, 10, 30]).to(device))  # another split of the same tokens, in place
    out, lse = varlen_attention(q, k, v, cu, cu, 60, 60, return_lse=True)
    assert reads == ["cu_seqlens_q"] * 2
    truth, truth_lse = attention_reference(q, k, v, cu, cu, causal=True)
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        cu[-1] = 99
        varlen_attention(q, k, v, cu, cu, 60, 60)
    with pytest.raises(ValueError, match="max_seqlen_q"):  # checked against the cached lengths too
        cu.copy_(_cu([60, 10, 30]).to(device))
        varlen_attention(q, k, v, cu, cu, 60, 60)
        varlen_attention(q, k, v, cu, cu, 59, 60)


@pytest.mark.gpu
def test_cached_call_does_not_sync_with_the_host():
    q, k, v, do, cu, _ = _inputs([200, 50, 300], [200, 50, 300], 4, 2, 128, torch.bfloat16, "cuda", seed=3)

    def layer():
        out = varlen_attention(q, k, v, cu, cu, 300, 300, causal=True)
        return torch.autograd.grad(out, (q, k, v), do)

    first = layer()  # reads and validates cu_seqlens, builds the tile tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        second = layer()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"softmax_scale": float("nan")}, "softmax_scale"),
        ({"softmax_scale": float("inf")}, "softmax_scale"),
        ({"softmax_scale": 0.0}, "softmax_scale"),
        ({"softmax_scale": -0.1}, "softmax_scale"),
        ({"softmax_scale": "0.1"}, "softmax_scale"),
        ({"max_seqlen_q": 2**40}, "max_seqlen_q"),
        ({"max_seqlen_k": 2**31}, "max_seqlen_k"),
        ({"max_seqlen_k": 6.0}, "max_seqlen_k"),
        ({"max_seqlen_q": -1}, "max_seqlen_q"),
    ],
)
def test_bad_scale_and_max_seqlen_raise_value_error(override, message):
    cu = _cu([4, 6])
    args = dict(
        q=torch.randn(10, 4, 64), k=torch.randn(10, 2, 64), v=torch.randn(10, 2, 64),
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        varlen_attention(**{**args, **override})


@pytest.mark.parametrize("head_dim", [60, 4, 100])
def test_flash_attn_pads_head_dims_that_are_not_multiples_of_8(head_dim, device, monkeypatch):
    """As flash-attn 2: zero-pad to a multiple of 8, run, slice; the default scale is 1/sqrt(head_dim)."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    q, k, v, do, cu_q, cu_k = _inputs([9, 23], [9, 23], 2, 1, head_dim, torch.float32, device, seed=7)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 23, 23, causal=True, return_attn_probs=True)
    assert out.shape == q.shape
    grads = torch.autograd.grad(out, (q, k, v), do)
    truth, truth_lse = attention_reference(q, k, v, cu_q, cu_k, causal=True)
    truth_grads = torch.autograd.grad(truth, (q, k, v), do.double())
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), truth_lse, atol=1e-5, rtol=0)
    for grad, expected in zip(grads, truth_grads, strict=True):
        assert grad.shape[-1] == head_dim
        torch.testing.assert_close(grad.double(), expected.double(), atol=1e-4, rtol=0)
