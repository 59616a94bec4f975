"""The work meter's interpreter hook counts what a kernel issues: dot FLOPs, masked bytes, programs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not an installed package

from benchmarks.work.counting import count_work, counting, interpreter_active  # noqa: E402

pytestmark = pytest.mark.skipif(not interpreter_active(), reason="counts only under TRITON_INTERPRET=1")


@triton.jit
def _toy_matmul(a_ptr, b_ptr, c_ptr, M, N, K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K)
    a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=rows[:, None] < M, other=0.0)
    b = tl.load(b_ptr + ks[:, None] * N + cols[None, :], mask=cols[None, :] < N, other=0.0)
    c = tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], c, mask=(rows[:, None] < M) & (cols[None, :] < N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counts_match_the_toy_kernel_by_hand(dtype):
    M, N, K, BM, BN = 37, 20, 16, 16, 16
    a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
    c = torch.zeros(M, N, dtype=dtype)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    work = count_work(lambda: _toy_matmul[grid](a, b, c, M, N, K, BM, BN))
    size = a.element_size()
    programs = grid[0] * grid[1]
    assert work.launches == 1 and work.programs == programs
    assert work.flops == programs * 2 * BM * BN * K  # padded tiles are issued too
    # every program loads its valid A rows and valid B columns; only in-bounds C is stored
    assert work.bytes_loaded == (grid[1] * M * K + grid[0] * K * N) * size
    assert work.bytes_stored == M * N * size
    assert work.by_kernel["_toy_matmul"].as_dict() == {k: v for k, v in work.as_dict().items() if k != "by_kernel"}
    torch.testing.assert_close(c.float(), a.float() @ b.float(), rtol=2e-2, atol=2e-2)


def test_counting_restores_the_interpreter_and_adds_launches():
    a, b, c = torch.randn(16, 16), torch.randn(16, 16), torch.zeros(16, 16)
    with counting() as work:
        _toy_matmul[(1, 1)](a, b, c, 16, 16, 16, 16, 16)
        _toy_matmul[(1, 1)](a, b, c, 16, 16, 16, 16, 16)
    assert work.launches == 2 and work.flops == 2 * 2 * 16**3
    after = count_work(lambda: None)
    assert after.flops == 0 and after.launches == 0
    _toy_matmul[(1, 1)](a, b, c, 16, 16, 16, 16, 16)  # runs outside counting without touching `work`
    assert work.launches == 2


def test_torch_ops_count_flops_and_bytes_once():
    a, b = torch.randn(8, 16), torch.randn(16, 4, dtype=torch.float32)
    work = count_work(lambda: (a @ b).sum())
    assert work.flops == 2 * 8 * 16 * 4 and work.launches == 0
    assert work.by_kernel["aten.mm"].bytes_loaded == (8 * 16 + 16 * 4) * 4
    assert work.by_kernel["aten.mm"].bytes_stored == 8 * 4 * 4
    rows = torch.tensor([1, 5])
    gathered = count_work(lambda: a.index_select(0, rows).t())  # a gather moves only its rows; a view is free
    assert gathered.bytes_stored == 2 * 16 * 4 and gathered.bytes_loaded == 2 * 16 * 4 + 2 * 8
    assert count_work(lambda: a @ b, torch_ops=False).flops == 0


def test_peak_held_follows_storage_made_inside_the_block():
    """Storage made in the block counts while a tensor holds it (a freed buffer's bytes are free again before the
    next allocation); views of storage from before the block, and storage made inside kernel launches, do not."""
    outside = torch.ones(1000)
    with counting() as work:
        first = torch.empty(1 << 18)  # 1 MiB
        del first
        second = torch.zeros(1 << 17)  # 0.5 MiB
        view = outside[10:]
        total = second + 1  # 0.5 MiB more
        assert view.shape == (990,)
    assert work.peak_held == 1 << 20
    with counting() as work:
        kept = [torch.zeros(1 << 16) for _ in range(3)]  # 3 x 256 KiB alive together
    assert work.peak_held == 3 << 18 and len(kept) == 3 and total.numel() == 1 << 17
