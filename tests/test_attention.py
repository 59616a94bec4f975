"""varlen_attention (Triton kernels under the interpreter, and the blockwise PyTorch path)
against a float64 reference with an explicit block-diagonal mask.

Accuracy follows FlashAttention's rule: the error of our output, and of dq/dk/dv, against
float64 must be at most twice (plus a small atol) the error of the same attention computed
in plain PyTorch in the inputs' dtype.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from qwenlong.kernels.attention import attention_reference, compile_specs, flash_attn_varlen_func, varlen_attention
from qwenlong.kernels.attention import varlen as varlen_module

BACKENDS = ("triton", "torch")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _inputs(lens_q, lens_k, heads, kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    q = randn(sum(lens_q), heads, head_dim)
    k = randn(sum(lens_k), kv_heads, head_dim)
    v = randn(sum(lens_k), kv_heads, head_dim)
    do = torch.randn(sum(lens_q), heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, do, _cu(lens_q).to(device), _cu(lens_k).to(device)


def _run(q, k, v, do, cu_q, cu_k, causal, window, deterministic=True):
    """Output, lse and gradients of our op."""
    lens_q, lens_k = cu_q.diff(), cu_k.diff()
    flags = dict(causal=causal, window_size=window, return_lse=True, deterministic=deterministic)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, int(lens_q.max()), int(lens_k.max()), **flags)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return out, lse, *grads


def _plain(q, k, v, do, cu_q, cu_k, causal, window, dtype):
    out, lse = attention_reference(q, k, v, cu_q, cu_k, causal=causal, window_size=window, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    return out, lse, *grads


def _check_accuracy(
    lens_q, lens_k, heads, kv_heads, head_dim, dtype, causal, window, device, seed=0, deterministic=True
):
    q, k, v, do, cu_q, cu_k = _inputs(lens_q, lens_k, heads, kv_heads, head_dim, dtype, device, seed)
    ours = _run(q, k, v, do, cu_q, cu_k, causal, window, deterministic)
    truth = _plain(q, k, v, do, cu_q, cu_k, causal, window, torch.float64)
    same_dtype = _plain(q, k, v, do, cu_q, cu_k, causal, window, dtype)

    out, lse = ours[0], ours[1]
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (heads, q.shape[0])
    # lse: -inf exactly where a query sees no key, fp32-accurate elsewhere
    assert torch.equal(torch.isneginf(lse).cpu(), torch.isneginf(truth[1]).cpu())
    finite = torch.isfinite(truth[1])
    torch.testing.assert_close(lse[finite].double(), truth[1][finite], atol=1e-4, rtol=0)

    for name, ours_t, truth_t, plain_t in zip(("out", "lse", "dq", "dk", "dv"), ours, truth, same_dtype, strict=True):
        if name == "lse":
            continue
        assert ours_t.dtype == dtype
        assert not ours_t.isnan().any(), f"{name} has NaNs (an element left unwritten or a bad mask)"
        error = (ours_t.double() - truth_t).abs().max().item() if ours_t.numel() else 0.0
        plain_error = (plain_t.double() - truth_t).abs().max().item() if ours_t.numel() else 0.0
        assert error <= 2 * plain_error + ATOL[dtype], f"{name}: error {error:.3g} vs plain {dtype} {plain_error:.3g}"


# (lens_q, lens_k, heads, kv_heads, head_dim, dtype, causal, window)
CASES = {
    "bf16-d128-gqa2-causal-empty-and-single": (
        [37, 0, 1, 130, 64], None, 4, 2, 128, torch.bfloat16, True, (-1, -1)),
    "fp16-d64-mqa-noncausal-q-shorter": ([20, 1, 90], [70, 5, 90], 4, 1, 64, torch.float16, False, (-1, -1)),
    "fp32-d96-causal-q-longer-and-shorter": ([40, 80, 3], [15, 130, 0], 2, 2, 96, torch.float32, True, (-1, -1)),
    "bf16-d64-sliding-window-causal": ([200, 33], None, 2, 1, 64, torch.bfloat16, True, (24, 0)),
    "fp16-d128-gqa4-window-both-sides": ([90, 17], [110, 17], 4, 1, 128, torch.float16, False, (16, 8)),
}  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_reference(backend, case, device, monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    lens_q, lens_k, heads, kv_heads, head_dim, dtype, causal, window = case
    _check_accuracy(lens_q, lens_k or lens_q, heads, kv_heads, head_dim, dtype, causal, window, device)


# The sm_90 tile table (wgmma-shaped tiles) under the interpreter: one case per row of TILES[90],
# lengths that leave partial tiles at 128/64/32 rows, and the padded head_dim 96.
SM90_CASES = {
    "d64-bf16-gqa2-causal-empty-and-single": ([150, 1, 0, 70], None, 2, 1, 64, torch.bfloat16, True, (-1, -1)),
    "d96-fp16-noncausal-window": ([130, 40], [100, 70], 2, 1, 96, torch.float16, False, (40, 20)),
    "d128-bf16-causal-q-shorter": ([70, 129], [90, 200], 2, 2, 128, torch.bfloat16, True, (-1, -1)),
    "d256-fp16-gqa2-causal": ([100, 3], None, 2, 1, 256, torch.float16, True, (-1, -1)),
}  # fmt: skip


def _use_tile_table(table, device, monkeypatch) -> list:
    """Make the launchers pick ``TILES[table]``; returns the list of devices they asked about."""
    if device == "cuda" and varlen_module.tile_table(torch.device(device)) != table:
        pytest.skip(f"the sm_{table} tiles are sized for that GPU's shared memory")
    asked = []
    monkeypatch.setattr(varlen_module, "tile_table", lambda device: asked.append(device) or table)
    return asked


@pytest.mark.parametrize("case", list(SM90_CASES.values()), ids=list(SM90_CASES))
def test_sm90_tiles_match_reference(case, device, monkeypatch):
    """The launchers with the sm_90 tile table, whatever runs them (the interpreter here)."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    asked = _use_tile_table(90, device, monkeypatch)
    lens_q, lens_k, heads, kv_heads, head_dim, dtype, causal, window = case
    _check_accuracy(lens_q, lens_k or lens_q, heads, kv_heads, head_dim, dtype, causal, window, device)
    assert len(asked) == 2, "forward and backward must pick their tiles from the device's table"


def test_older_triton_keeps_the_32_row_dkdv_tiles(device, monkeypatch):
    """Before Triton 3.9 the sm_90 dk/dv kernel at head_dim 96-128 takes 32 query rows, deterministic and atomic
    (their 64-row tiles spill with Triton 3.6): the launcher picks them, and they are right; other tiles and
    dtypes are unchanged."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    monkeypatch.setattr(varlen_module, "_triton_version", lambda: (3, 9))  # whatever Triton runs the test
    newer = varlen_module._configs(128, torch.bfloat16, 90)
    monkeypatch.setattr(varlen_module, "_triton_version", lambda: (3, 6))
    older = varlen_module._configs(128, torch.bfloat16, 90)
    dkdv = ("dkdv", "dkdv_atomic")
    assert [(newer[name]["BLOCK_M"], older[name]["BLOCK_M"]) for name in dkdv] == [(64, 32), (64, 32)]
    assert {name: cfg for name, cfg in older.items() if name not in dkdv} == {
        name: cfg for name, cfg in newer.items() if name not in dkdv}
    assert varlen_module._configs(128, torch.float32, 90) == varlen_module._configs(128, torch.float32, 80)
    _use_tile_table(90, device, monkeypatch)
    for deterministic in (True, False):
        _check_accuracy([70, 129], [90, 200], 2, 2, 128, torch.bfloat16, True, (-1, -1), device,
                        deterministic=deterministic)  # fmt: skip


@pytest.mark.parametrize("deterministic", [True, False])
def test_newer_triton_tiles_are_right_whatever_compiles_them(deterministic, device, monkeypatch):
    """The 64-row sm_90 dk/dv tiles at head_dim 128 (the atomic build's dq in two 32-row halves), forced whatever
    Triton is installed: on a GPU machine with an older Triton this is the only test that runs them (slower there,
    with spills, but they must still be right)."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    monkeypatch.setattr(varlen_module, "_triton_version", lambda: varlen_module.NEWER_TRITON)
    name = "dkdv" if deterministic else "dkdv_atomic"
    assert varlen_module._configs(128, torch.float16, 90)[name]["BLOCK_M"] == 64
    _use_tile_table(90, device, monkeypatch)
    _check_accuracy([70, 129, 33], [90, 200, 33], 4, 2, 128, torch.float16, True, (-1, -1), device,
                    deterministic=deterministic)  # fmt: skip


def _shifted(x: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``x`` that starts 2 bytes past an aligned address of its storage."""
    storage = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    shifted = storage[1:].view(x.shape)
    shifted.copy_(x.detach())
    return shifted.requires_grad_(x.requires_grad)


def test_views_descriptors_cannot_describe_are_copied(device, monkeypatch):
    """The kernels read k and v (forward, dq) and q and do (dk/dv) through tensor descriptors (16-byte aligned
    base and strides): a view at an odd offset of its storage is copied first; the results are the same bits
    as from aligned inputs."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    q, k, v, do, cu_q, cu_k = _inputs([40, 23], [40, 23], 2, 1, 64, torch.bfloat16, device, seed=5)
    shifted = [_shifted(x) for x in (q, k, v, do)]
    assert all(x.data_ptr() % 16 != 0 and varlen_module._describable(x) is not x for x in shifted)
    assert varlen_module._describable(q) is q
    copy = varlen_module._describable(shifted[0])
    assert copy.data_ptr() % 16 == 0 and torch.equal(copy, shifted[0])
    aligned = _run(q, k, v, do, cu_q, cu_k, True, (-1, -1))
    unaligned = _run(*shifted, cu_q, cu_k, True, (-1, -1))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), aligned, unaligned, strict=True):
        assert torch.equal(a, b), name


def test_scratch_allocator_is_set_where_none_is():
    """Descriptors made on the device need Triton's scratch allocator, a per-context setting: the launchers set
    PyTorch's where none is set (a new thread, as autograd's backward threads, starts without one) and leave a
    caller's own alone."""
    import threading

    import triton
    from triton.runtime import _allocation

    from qwenlong.kernels.utils import descriptors

    token = _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
    try:
        descriptors.ensure_scratch_allocator(torch.device("cuda"))
        assert _allocation._allocator.get() is descriptors.scratch
        seen = []
        thread = threading.Thread(target=lambda: seen.append(_allocation._allocator.get()))
        thread.start()
        thread.join()
        assert isinstance(seen[0], _allocation.NullAllocator)  # why every launch checks

        def own(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)

        triton.set_allocator(own)
        descriptors.ensure_scratch_allocator(torch.device("cuda"))
        assert _allocation._allocator.get() is own
        _allocation._allocator.set(_allocation._NULL_ALLOCATOR)
        descriptors.ensure_scratch_allocator(torch.device("cpu"))  # the interpreter needs none
        assert isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    finally:
        _allocation._allocator.reset(token)


# deterministic=False: dq added with fp32 atomics inside the dk/dv kernel (bf16/fp16: by descriptor reductions,
# run by the interpreter fix; fp32: by pointer atomics). Tile table 80 is the interpreter's own;
# 90 runs sm_90's atomic tiles (64x128 at d64-d128: dq in two 32-row halves).
ATOMIC_CASES = {
    "bf16-d128-gqa2-causal-packed": ([37, 0, 1, 130, 64], None, 4, 2, 128, torch.bfloat16, True, (-1, -1), 80),
    "fp16-d64-gqa4-window-both-sides-q-shorter": (
        [20, 1, 90, 45], [70, 5, 90, 30], 4, 1, 64, torch.float16, False, (16, 8), 80),
    "fp32-d96-sliding-window-causal": ([40, 80, 3], [15, 130, 0], 2, 2, 96, torch.float32, True, (24, 0), 80),
    # head_dim 96 in 128-wide tiles: dq rows 96 wide, the reduced blocks 128
    "bf16-d96-gqa2-causal-packed": ([50, 3, 70], None, 4, 2, 96, torch.bfloat16, True, (-1, -1), 80),
    "sm90-bf16-d64-gqa2-causal-packed": ([150, 1, 0, 70], None, 2, 1, 64, torch.bfloat16, True, (-1, -1), 90),
    "sm90-fp16-d128-window-packed": ([70, 129, 33], [90, 200, 33], 4, 2, 128, torch.float16, False, (40, 20), 90),
    "sm90-fp16-d64-gqa4-window-q-shorter": (
        [20, 1, 90, 45], [70, 5, 130, 30], 4, 1, 64, torch.float16, False, (16, 8), 90),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ATOMIC_CASES.values()), ids=list(ATOMIC_CASES))
def test_atomic_dq_backward_matches_reference(case, device, monkeypatch):
    """The 5-GEMM backward's dq, dk and dv against float64, within the same bounds as the deterministic one."""
    monkeypatch.setenv("QWENLONG_BACKEND", "triton")
    *case, table = case
    _use_tile_table(table, device, monkeypatch)
    lens_q, lens_k, heads, kv_heads, head_dim, dtype, causal, window = case
    _check_accuracy(lens_q, lens_k or lens_q, heads, kv_heads, head_dim, dtype, causal, window, device,
                    deterministic=False)  # fmt: skip


@pytest.mark.parametrize("backend,deterministic", [("torch", True), ("triton", True), ("triton", False)])
def test_gradients_through_lse(backend, deterministic, device, monkeypatch):
    """A loss that reads lse as well as out (attention merged over parts of the keys by their lse) gets lse's
    share of the gradients, against float64; and a loss of lse alone. Every query sees a key (a row that sees
    none has lse = -inf, whose float64 reference gradient is NaN)."""
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    lens_q, lens_k = [9, 1, 20], [14, 3, 20]
    q, k, v, do, cu_q, cu_k = _inputs(lens_q, lens_k, 4, 2, 32, torch.float32, device, seed=5)
    dlse = torch.randn(4, sum(lens_q), generator=torch.Generator().manual_seed(6)).to(device)
    flags = dict(causal=True, window_size=(6, 0), return_lse=True, deterministic=deterministic)
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, 20, 20, **flags)
    ref_out, ref_lse = attention_reference(q, k, v, cu_q, cu_k, causal=True, window_size=(6, 0))
    assert lse.requires_grad
    for loss, ref_loss in (((out * do).sum() + (lse * dlse).sum(), (ref_out * do).sum() + (ref_lse * dlse).sum()),
                           ((lse * dlse).sum(), (ref_lse * dlse).sum())):
        ours = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
        expected = torch.autograd.grad(ref_loss, (q, k, v), retain_graph=True, allow_unused=True)
        expected = [torch.zeros_like(x) if g is None else g for g, x in zip(expected, (q, k, v), strict=True)]
        for name, a, b in zip(("dq", "dk", "dv"), ours, expected, strict=True):  # lse alone: dv = 0
            torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # merging two halves of the keys by their lse gives full attention's gradients
    half = _cu([n // 2 for n in lens_k]).to(device)
    rest = _cu([n - n // 2 for n in lens_k]).to(device)
    first = torch.cat([k[s:s + n // 2] for s, n in zip(cu_k[:-1].tolist(), lens_k, strict=True)])
    second = torch.cat([k[s + n // 2:s + n] for s, n in zip(cu_k[:-1].tolist(), lens_k, strict=True)])
    values = [torch.cat([v[s:s + n // 2] for s, n in zip(cu_k[:-1].tolist(), lens_k, strict=True)]),
              torch.cat([v[s + n // 2:s + n] for s, n in zip(cu_k[:-1].tolist(), lens_k, strict=True)])]
    parts = [varlen_attention(q, kk, vv, cu_q, cu, 20, 20, causal=False, return_lse=True,
                              deterministic=deterministic) for kk, vv, cu in ((first, values[0], half),
                                                                               (second, values[1], rest))]
    (o1, l1), (o2, l2) = parts
    merged_lse = torch.logaddexp(l1, l2)
    merged = (l1 - merged_lse).exp().T[..., None] * o1 + (l2 - merged_lse).exp().T[..., None] * o2
    full = attention_reference(q, k, v, cu_q, cu_k, causal=False)[0]
    ours = torch.autograd.grad((merged * do).sum(), (q, k, v))
    expected = torch.autograd.grad((full * do).sum(), (q, k, v))
    for name, a, b in zip(("dq", "dk", "dv"), ours, expected, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5,
                                   msg=lambda m, n=name: f"merged {n}: {m}")


def _random_case(seed: int):
    rng = random.Random(seed)
    batch = rng.randint(2, 4)
    lens_q = [rng.choice([0, 1, rng.randint(2, 300)]) for _ in range(batch)]
    same = rng.random() < 0.5
    lens_k = lens_q if same else [max(0, n + rng.randint(-20, 40)) for n in lens_q]
    kv_heads = rng.choice([1, 2])
    heads = kv_heads * rng.choice([1, 2])
    head_dim = rng.choice([64, 96, 128])
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    window = rng.choice([(-1, -1), (rng.randint(0, 64), rng.randint(0, 64))])
    return lens_q, lens_k, heads, kv_heads, head_dim, dtype, rng.random() < 0.5, window


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [10, 19])
def test_random_packed_batches(backend, seed, device, monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    _check_accuracy(*_random_case(seed), device, seed=seed)


@pytest.mark.parametrize("backend,table", [("triton", 80), ("triton", 90), ("torch", None)])
def test_sequence_alone_or_packed_is_bitwise_identical(backend, table, device, monkeypatch):
    """A sequence's output, lse and gradients do not depend on what is packed beside it."""
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    if table is not None:
        _use_tile_table(table, device, monkeypatch)
    heads, kv_heads, head_dim, dtype = 2, 1, 64, torch.bfloat16
    lens = [45, 140, 3, 0, 30]
    target = 1  # the 140-token sequence, packed at an offset
    q, k, v, do, cu, _ = _inputs(lens, lens, heads, kv_heads, head_dim, dtype, device, seed=3)
    start, end = int(cu[target]), int(cu[target + 1])
    packed = _run(q, k, v, do, cu, cu, True, (-1, -1))

    alone_inputs = [t[start:end].detach().clone().requires_grad_() for t in (q, k, v)]
    cu_alone = _cu([end - start]).to(device)
    alone = _run(*alone_inputs, do[start:end].clone(), cu_alone, cu_alone, True, (-1, -1))

    out, lse, dq, dk, dv = packed
    for name, p, a in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (alone[0], *alone[2:]), strict=True):
        assert torch.equal(p[start:end], a), f"{name} changed when packed"
    assert torch.equal(lse[:, start:end], alone[1])


def test_backends_agree(device, monkeypatch):
    """The Triton kernels and the blockwise PyTorch path compute the same function."""
    args = _inputs([60, 0, 130], [60, 0, 130], 2, 1, 64, torch.float32, device, seed=5)
    results = {}
    for backend in BACKENDS:
        monkeypatch.setenv("QWENLONG_BACKEND", backend)
        results[backend] = _run(*args, True, (-1, -1))
    for ours, theirs in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_flash_attn_compat(device, monkeypatch):
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    q, k, v, _, cu_q, cu_k = _inputs([9, 23], [9, 23], 2, 2, 64, torch.float32, device)
    out, lse, probs = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 23, 23, return_attn_probs=True)
    truth, truth_lse = attention_reference(q, k, v, cu_q, cu_k, causal=False)  # FlashAttention's default
    torch.testing.assert_close(out.double(), truth, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse.double(), truth_lse, atol=1e-5, rtol=0)
    assert probs is None
    for kwargs, name in (
        ({"dropout_p": 0.1}, "dropout_p"),
        ({"softcap": 30.0}, "softcap"),
        ({"alibi_slopes": torch.ones(2)}, "alibi_slopes"),
        ({"block_table": torch.zeros(2, 1, dtype=torch.int32)}, "block_table"),
    ):
        with pytest.raises(ValueError, match=name):
            flash_attn_varlen_func(q, k, v, cu_q, cu_k, 23, 23, **kwargs)


def _bad_inputs():
    q = torch.randn(10, 4, 64)
    k = torch.randn(10, 2, 64)
    cu = _cu([4, 6])
    yield "cu_seqlens_q", dict(cu_seqlens_q=cu.long())
    yield "cu_seqlens_q", dict(cu_seqlens_q=torch.tensor([0, 7, 5, 10], dtype=torch.int32))
    yield "cu_seqlens_k", dict(cu_seqlens_k=_cu([4, 5]))
    yield "cu_seqlens_q and cu_seqlens_k", dict(cu_seqlens_q=_cu([10]))
    yield "k.shape", dict(k=torch.randn(10, 2, 32), v=torch.randn(10, 2, 32))
    yield "v must have k's shape", dict(v=torch.randn(10, 1, 64))
    yield "heads", dict(k=torch.randn(10, 3, 64), v=torch.randn(10, 3, 64))
    yield "head_dim", dict(q=torch.randn(10, 4, 60), k=torch.randn(10, 2, 60), v=torch.randn(10, 2, 60))
    yield "head_dim", dict(q=torch.randn(10, 4, 320), k=torch.randn(10, 2, 320), v=torch.randn(10, 2, 320))
    yield "k is on meta", dict(k=torch.randn(10, 2, 64, device="meta"))
    yield "q must have 3", dict(q=q[None])
    yield "dtype", dict(q=q.double(), k=k.double(), v=k.double())
    yield "share a dtype", dict(k=k.half())
    yield "max_seqlen_q", dict(max_seqlen_q=5)
    yield "window_size", dict(window_size=(-2, 0))
    yield "window_size", dict(window_size=None)
    yield "window_size", dict(window_size=4)
    yield "window_size", dict(window_size=(True, False))
    yield "window_size", dict(window_size=(1, 2, 3))
    yield "window_size", dict(window_size=(1.0, 0))
    yield "cu_seqlens_q must be contiguous", dict(cu_seqlens_q=torch.stack([cu, cu], 1)[:, 0])
    yield "deterministic", dict(deterministic=0)


@pytest.mark.parametrize("message,override", list(_bad_inputs()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_input_raises_value_error(message, override):
    cu = _cu([4, 6])
    args = dict(
        q=torch.randn(10, 4, 64), k=torch.randn(10, 2, 64), v=torch.randn(10, 2, 64),
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=6, max_seqlen_k=6,
    )  # fmt: skip
    args.update(override)
    with pytest.raises(ValueError, match=message):
        varlen_attention(**args)


def test_window_size_takes_any_integers(monkeypatch):
    """numpy integers (a window read from a config array) are ints: the same result as Python's."""
    monkeypatch.setenv("QWENLONG_BACKEND", "torch")
    q, k, v, _, cu_q, cu_k = _inputs([5, 9], [5, 9], 2, 2, 16, torch.float32, "cpu")
    expected = varlen_attention(q, k, v, cu_q, cu_k, 9, 9, window_size=(2, 0))
    assert torch.equal(varlen_attention(q, k, v, cu_q, cu_k, 9, 9, window_size=np.array([2, 0])), expected)
    assert not torch.equal(varlen_attention(q, k, v, cu_q, cu_k, 9, 9), expected)  # the window counts


def test_compile_specs_cover_every_kernel_build():
    """Each config a launcher picks, for each tile table, is a spec the report compiles for that arch."""
    specs = compile_specs()
    built = {}
    for spec in specs:
        assert list(spec.signature) == list(spec.fn.arg_names)
        constexprs = {name for name, ty in spec.signature.items() if ty == "constexpr"}
        assert constexprs == set(spec.constexprs)
        assert spec.aligned and all(spec.signature[name] != "constexpr" for name in spec.aligned)
        for arch in spec.archs:
            assert (spec.name, arch) not in built, f"two builds of {spec.name} for sm_{arch}"
            built[spec.name, arch] = spec
    for table in varlen_module.TILES:
        for dtype, ty in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
            for head_dim in (64, 96, 128, 256):
                configs = varlen_module._configs(head_dim, dtype, table)
                for kernel in varlen_module.KERNELS:
                    spec = built[f"attention_{kernel}_{ty}_d{head_dim}", table]
                    config = configs[kernel]
                    assert (spec.num_warps, spec.num_stages) == (config["num_warps"], config["num_stages"])
                    assert (spec.constexprs["BLOCK_M"], spec.constexprs["BLOCK_N"]) == (
                        config["BLOCK_M"], config["BLOCK_N"])  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend, device, monkeypatch):
    """The attention backward is not differentiable again: differentiating a gradient taken with
    create_graph=True raises, naming varlen_attention (the Triton path silently dropped the second derivative,
    the blockwise path raised an unrelated in-place error). A single backward is untouched."""
    monkeypatch.setenv("QWENLONG_BACKEND", backend)
    q, k, v, do, cu_q, cu_k = _inputs([5, 3], [5, 3], 2, 1, 8, torch.float32, device, seed=7)
    out = varlen_attention(q, k, v, cu_q, cu_k, 5, 5)
    (dq,) = torch.autograd.grad(out, q, do, create_graph=True)
    with pytest.raises(RuntimeError, match="varlen_attention does not support double backward"):
        torch.autograd.grad((dq**2).sum() + q.sum(), (q, k, v), allow_unused=True)
    assert torch.equal(dq.detach(), torch.autograd.grad(varlen_attention(q, k, v, cu_q, cu_k, 5, 5), q, do)[0])
