"""Fused attention over packed variable-length sequences (FlashAttention-2 style), in Triton.

Sequences of different lengths are packed without padding: ``q`` is ``(total_q, heads, d)``,
``k``/``v`` are ``(total_k, kv_heads, d)`` and ``cu_seqlens_q/k`` (int32, ``batch + 1``)
mark where each sequence starts. For a query row ``i`` of one sequence and its keys ``j``::

    s_ij = scale * q_i . k_j                        (masked to -inf where j is not allowed)
    lse_i = log sum_j exp(s_ij)                     (fp32, returned for merging partial results)
    o_i  = sum_j exp(s_ij - lse_i) v_j

Allowed keys follow FlashAttention: query ``i`` sits at key position ``i + k_len - q_len``
(bottom-right alignment) and sees ``j`` in ``[pos - left, pos + right]`` for
``window_size = (left, right)`` (``-1``: unbounded; ``causal`` sets ``right = 0``). A query
that sees no key gets ``o_i = 0`` and ``lse_i = -inf``.

Forward: one program per (query block, head, sequence); it streams the key blocks its rows
may see with an online softmax in base 2 (``exp2`` with ``log2(e)`` folded into the scale),
accumulating in fp32. Blocks outside the causal/window band are never visited, and only
the blocks on its edges (or at the sequence end) evaluate the mask.

Backward (recompute, nothing of size ``T x T`` is stored), with ``dO`` the output gradient::

    delta_i = dO_i . o_i
    p_ij = exp(s_ij - lse_i),   dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
    dv_j = sum_i p_ij dO_i,     dk_j = scale sum_i ds_ij q_i,     dq_i = scale sum_j ds_ij k_j

``dk``/``dv`` come from one program per (key block, kv head, sequence) that loops over the
query heads of its group and the query blocks that see it; ``dq`` from a second pass over
(query block, head, sequence). No atomics, so gradients are deterministic.

Tiles never span two sequences and tile shapes depend only on ``head_dim``, dtype and the GPU
generation (a table for sm_90's wgmma, one for the others), so a sequence's outputs and
gradients are bitwise the same alone or packed with others. GQA:
query head ``h`` reads kv head ``h // (heads // kv_heads)``.
"""

from __future__ import annotations

import math
import operator

import torch
import triton
import triton.language as tl

from ..backend import select_backend
from ..utils.checks import check_cu_seqlens, check_dim, check_same_device, check_tensor
from ..utils.compile_spec import CompileSpec
from .blockwise import BlockwiseAttention

LOG2E = math.log2(math.e)
UNBOUNDED = 1 << 30  # a window side that is "unbounded": wider than any sequence
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _allowed(rows, cols, q_len, k_len, window_left, window_right):
    """True where query ``rows`` may attend key ``cols`` (broadcast shapes, sequence-local)."""
    position = rows + (k_len - q_len)  # bottom-right alignment
    in_bounds = (rows < q_len) & (cols < k_len)
    return in_bounds & (cols >= position - window_left) & (cols <= position + window_right)


@triton.jit
def _unmasked_span(start, end, full_start, full_end, BLOCK: tl.constexpr):
    """The whole blocks of ``[full_start, full_end)`` (where no mask applies), clamped into ``[start, end)``."""
    full_start = tl.cdiv(tl.maximum(full_start, 0), BLOCK) * BLOCK
    full_end = (tl.maximum(full_end, 0) // BLOCK) * BLOCK
    span_start = tl.minimum(tl.maximum(full_start, start), end)
    return span_start, tl.maximum(tl.minimum(full_end, end), span_start)


@triton.jit
def _key_ranges(first_row, last_row, q_len, k_len, window_left, window_right, BLOCK_N: tl.constexpr):
    """Key blocks that rows ``first_row..last_row`` see, ``[lo, hi)`` (lo block aligned), and the
    blocks ``[full_lo, full_hi)`` inside it that need no mask: every row of the tile sees
    every key of such a block. Blocks outside ``[lo, hi)`` are fully masked and never visited.
    """
    position = k_len - q_len  # key position of query row 0 (bottom-right alignment)
    lo = (tl.maximum(first_row + position - window_left, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(last_row + position + window_right + 1, k_len)
    full_end = tl.minimum(first_row + position + window_right + 1, k_len)
    full_lo, full_hi = _unmasked_span(lo, hi, last_row + position - window_left, full_end, BLOCK_N)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(first_col, last_col, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr):
    """Query blocks that see keys ``first_col..last_col``, split like :func:`_key_ranges`."""
    position = k_len - q_len
    lo = (tl.maximum(first_col - position - window_right, 0) // BLOCK_M) * BLOCK_M
    hi = tl.minimum(last_col - position + window_left + 1, q_len)
    full_end = tl.minimum(first_col - position + window_left + 1, q_len)
    full_lo, full_hi = _unmasked_span(lo, hi, last_col - position - window_right, full_end, BLOCK_M)
    return lo, full_lo, full_hi, hi


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    qk_scale_log2, group, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    q_block, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    first_row = q_block * BLOCK_M
    if first_row >= q_len:  # the grid covers the longest sequence; shorter ones stop here
        return
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
    kv_head = head // group

    rows = first_row + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    tile_mask = (rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM)
    q_offsets = rows[:, None] * stride_qt + dims[None, :]
    q = tl.load(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh + q_offsets, mask=tile_mask, other=0.0)
    # sequence bases as scalars, tile offsets in int32: no 64-bit pointer tiles held across the loop
    K_seq = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V_seq = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh

    offs_n = tl.arange(0, BLOCK_N)
    dim_ok = dims < HEAD_DIM  # BLOCK_D pads head dims that are not a power of two
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of s, in log2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, hi = _key_ranges(first_row, last_row, q_len, k_len, window_left, window_right, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < k_len
        kt = tl.load(K_seq + cols[None, :] * stride_kt + dims[:, None], mask=dim_ok[:, None] & key_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        if (start_n < full_lo) | (start_n >= full_hi):  # a block on the causal/window edge or the sequence end
            s = tl.where(_allowed(rows[:, None], cols[None, :], q_len, k_len, window_left, window_right), s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # a row with nothing allowed yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.math.exp2(s - shift[:, None])
        rescale = tl.math.exp2(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = tl.load(V_seq + cols[:, None] * stride_vt + dims[None, :], mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    o_offsets = rows[:, None] * stride_ot + dims[None, :]
    tl.store(Out + q_start.to(tl.int64) * stride_ot + head * stride_oh + o_offsets, out.to(Out.dtype.element_ty),
             mask=tile_mask)  # fmt: skip
    lse = (row_max + tl.math.log2(tl.where(row_sum == 0.0, 1.0, row_sum))) / 1.4426950408889634  # empty: -inf
    tl.store(Lse + head * stride_lh + q_start + rows, lse, mask=rows < q_len)


@triton.jit
def _attn_bwd_delta(
    Out, DO, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O), fp32, one value per (head, token)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < total_q) & (dims[None, :] < HEAD_DIM)
    o = tl.load(Out + head * stride_oh + rows[:, None].to(tl.int64) * stride_ot + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + head * stride_doh + rows[:, None].to(tl.int64) * stride_dot + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head * stride_dh + rows, delta, mask=rows < total_q)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    qk_scale_log2, softmax_scale, group, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv for one key block of one kv head: sums over every query head of its group."""
    k_block, kv_head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
    first_col = k_block * BLOCK_N
    if first_col >= k_len:
        return
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start

    cols = first_col + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    tile_mask = (cols[:, None] < k_len) & (dims[None, :] < HEAD_DIM)
    k_offsets = cols[:, None] * stride_kt + dims[None, :]
    v_offsets = cols[:, None] * stride_vt + dims[None, :]
    k = tl.load(K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh + k_offsets, mask=tile_mask, other=0.0)
    v = tl.load(V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh + v_offsets, mask=tile_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    last_col = tl.minimum(first_col + BLOCK_N, k_len) - 1
    lo, full_lo, full_hi, hi = _query_ranges(first_col, last_col, q_len, k_len, window_left, window_right, BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    dim_ok = dims < HEAD_DIM
    for head in range(kv_head * group, (kv_head + 1) * group):
        Q_seq = Q + q_start.to(tl.int64) * stride_qt + head * stride_qh
        DO_seq = DO + q_start.to(tl.int64) * stride_dot + head * stride_doh
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < q_len
            qt = tl.load(Q_seq + rows[None, :] * stride_qt + dims[:, None], mask=dim_ok[:, None] & row_ok[None, :],
                         other=0.0)  # fmt: skip
            do = tl.load(DO_seq + rows[:, None] * stride_dot + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                         other=0.0)  # fmt: skip
            lse_log2 = tl.load(Lse + head * stride_lh + q_start + rows, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(Delta + head * stride_lh + q_start + rows, mask=row_ok, other=0.0)
            st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale_log2  # (BLOCK_N, BLOCK_M): s transposed
            pt = tl.math.exp2(st - lse_log2[None, :])
            if (start_m < full_lo) | (start_m >= full_hi):  # where, not -inf scores: rows with lse=-inf give 0
                pt = tl.where(_allowed(rows[None, :], cols[:, None], q_len, k_len, window_left, window_right), pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

    dk_offsets = cols[:, None] * stride_dkt + dims[None, :]
    dv_offsets = cols[:, None] * stride_dvt + dims[None, :]
    tl.store(DK + k_start.to(tl.int64) * stride_dkt + kv_head * stride_dkh + dk_offsets,
             (dk * softmax_scale).to(DK.dtype.element_ty), mask=tile_mask)  # fmt: skip
    tl.store(DV + k_start.to(tl.int64) * stride_dvt + kv_head * stride_dvh + dv_offsets,
             dv.to(DV.dtype.element_ty), mask=tile_mask)  # fmt: skip


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    qk_scale_log2, softmax_scale, group, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq for one query block of one head: streams the key blocks its rows see."""
    q_block, head, seq = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    first_row = q_block * BLOCK_M
    if first_row >= q_len:
        return
    k_start = tl.load(cu_seqlens_k + seq)
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
    kv_head = head // group

    rows = first_row + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    tile_mask = (rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM)
    q = tl.load(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh + rows[:, None] * stride_qt + dims[None, :],
                mask=tile_mask, other=0.0)  # fmt: skip
    do = tl.load(DO + q_start.to(tl.int64) * stride_dot + head * stride_doh + rows[:, None] * stride_dot + dims[None, :],
                 mask=tile_mask, other=0.0)  # fmt: skip
    lse_log2 = tl.load(Lse + head * stride_lh + q_start + rows, mask=rows < q_len, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + head * stride_lh + q_start + rows, mask=rows < q_len, other=0.0)
    K_seq = K + k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V_seq = V + k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, hi = _key_ranges(first_row, last_row, q_len, k_len, window_left, window_right, BLOCK_N)
    offs_n = tl.arange(0, BLOCK_N)
    dim_ok = dims < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = dim_ok[:, None] & (cols[None, :] < k_len)
        kt = tl.load(K_seq + cols[None, :] * stride_kt + dims[:, None], mask=kv_mask, other=0.0)
        vt = tl.load(V_seq + cols[None, :] * stride_vt + dims[:, None], mask=kv_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.math.exp2(s - lse_log2[:, None])
        if (start_n < full_lo) | (start_n >= full_hi):
            p = tl.where(_allowed(rows[:, None], cols[None, :], q_len, k_len, window_left, window_right), p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

    dq_offsets = rows[:, None] * stride_dqt + dims[None, :]
    tl.store(DQ + q_start.to(tl.int64) * stride_dqt + head * stride_dqh + dq_offsets,
             (dq * softmax_scale).to(DQ.dtype.element_ty), mask=tile_mask)  # fmt: skip


# ----------------------------------------------------------------------------- configs


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed on the padded head_dim (BLOCK_D) and the
# GPU's tile table, never on sequence lengths: tiles that compile without register spills
# (tools/compile_report.py, docs/compile_report.md), not yet timed on a GPU.
# sm_90 tiles are shaped for wgmma (HGMMA): Triton issues it for a dot whose result has a multiple
# of 64 rows and of 8 columns, with warps in whole warpgroups (num_warps % 4 == 0). The rows are
# BLOCK_M in fwd and dq and BLOCK_N in dkdv (its dots produce key-major tiles).
TILES = {
    80: {  # mma.sync (HMMA): sm_80 and every GPU other than sm_90
        64: {"fwd": (128, 64, 8, 3), "dkdv": (16, 64, 4, 3), "dq": (64, 32, 4, 3)},
        128: {"fwd": (128, 32, 8, 3), "dkdv": (16, 64, 8, 3), "dq": (32, 32, 4, 3)},
        256: {"fwd": (64, 32, 8, 2), "dkdv": (16, 32, 8, 2), "dq": (32, 16, 8, 2)},
    },
    90: {  # wgmma (HGMMA)
        64: {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 2), "dq": (64, 64, 4, 3)},
        128: {"fwd": (128, 64, 8, 2), "dkdv": (32, 64, 8, 3), "dq": (64, 64, 8, 2)},
        # dkdv: 64-key tiles spill at head_dim 256 (two 64x256 fp32 accumulators), so it keeps mma.sync
        256: {"fwd": (64, 32, 8, 2), "dkdv": (16, 32, 8, 2), "dq": (64, 32, 8, 2)},
    },
}
KERNELS = ("fwd", "dkdv", "dq")


def tile_table(device: torch.device) -> int:
    """Which ``TILES`` table the GPU of ``device`` uses: 90 on sm_90, else 80 (also the interpreter's)."""
    # ROCm builds report their own gfx versions as capabilities (MI300 is "9.4"): not sm_90
    if device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] == 9:
        return 90
    return 80


def _configs(head_dim: int, dtype: torch.dtype, table: int) -> dict[str, dict[str, int]]:
    """Launch configs per kernel from ``TILES[table]`` for head_dim and dtype."""
    block_d = _block_d(head_dim)
    tiles = TILES[80 if dtype == torch.float32 else table]  # fp32 runs ieee dots: no wgmma to shape for
    configs = tiles[min(size for size in tiles if size >= block_d)]
    if dtype == torch.float32:  # fp32 tiles take twice the registers
        configs = {name: (max(16, m // 2), max(16, n // 2), w, st) for name, (m, n, w, st) in configs.items()}
    return {
        name: {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st} for name, (m, n, w, st) in configs.items()
    }


DELTA_BLOCK_M = 64


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


# ----------------------------------------------------------------------------- launchers


def _triton_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, window_left, window_right):
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty(heads, total_q, device=q.device, dtype=torch.float32)
    cfg = _configs(head_dim, q.dtype, tile_table(q.device))["fwd"]
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), heads, batch)
    if batch > 0 and max_seqlen_q > 0:
        _attn_fwd[grid](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            scale * LOG2E, heads // k.shape[1], window_left, window_right,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), DOT_PRECISION=_dot_precision(q.dtype), **cfg,
        )  # fmt: skip
    return out, lse


def _triton_backward(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window):
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    batch = cu_seqlens_q.numel() - 1
    block_d = _block_d(head_dim)
    precision = _dot_precision(q.dtype)
    cfgs = _configs(head_dim, q.dtype, tile_table(q.device))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    if total_q > 0:
        _attn_bwd_delta[(triton.cdiv(total_q, DELTA_BLOCK_M), heads)](
            out, do, delta, total_q, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d,
        )  # fmt: skip
    common = (scale * LOG2E, scale, heads // kv_heads, *window)
    if batch > 0 and max_seqlen_k > 0:
        cfg = cfgs["dkdv"]
        _attn_bwd_dkdv[(triton.cdiv(max_seqlen_k, cfg["BLOCK_N"]), kv_heads, batch)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), *common,
            HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg,
        )  # fmt: skip
    if batch > 0 and max_seqlen_q > 0:
        cfg = cfgs["dq"]
        _attn_bwd_dq[(triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), heads, batch)](
            q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1), lse.stride(0), *common,
            HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg,
        )  # fmt: skip
    return dq, dk, dv


class TritonVarlenAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse; the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right):
        out, lse = _triton_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, scale, window_left, window_right)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, (window_left, window_right))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, scale, window = ctx.args
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = _triton_backward(
            do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window
        )
        return dq, dk, dv, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public op


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size):
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    check_tensor("q", q, ndim=3, dtypes=dtypes)
    check_tensor("k", k, ndim=3, dtypes=dtypes)
    check_tensor("v", v, ndim=3, dtypes=dtypes)
    device = check_same_device(q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    heads, head_dim = q.shape[1], q.shape[2]
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[2]) must be a multiple of 8 in [8, {MAX_HEAD_DIM}], got {head_dim}")
    check_dim("k", k, 2, head_dim, "q's head_dim")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"q's heads ({heads}) must be a multiple of k's kv heads ({kv_heads})")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], device)
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_seqlens_q.numel()} "
            f"and {cu_seqlens_k.numel()} entries"
        )
    for name, cu, given in (("max_seqlen_q", cu_seqlens_q, max_seqlen_q), ("max_seqlen_k", cu_seqlens_k, max_seqlen_k)):
        longest = int(cu.diff().max()) if cu.numel() > 1 else 0
        try:
            too_short = operator.index(given) < longest  # ints, numpy ints and 0-d integer tensors
        except TypeError:
            too_short = True
        if too_short:
            raise ValueError(f"{name} must be an int >= the longest sequence ({longest}), got {given!r}")
    if len(window_size) != 2 or not all(isinstance(w, int) and w >= -1 for w in window_size):
        raise ValueError(f"window_size must be two ints >= -1 (-1: unbounded), got {window_size!r}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
):
    """Attention over packed sequences; see the module docstring for the math and masking.

    q ``(total_q, heads, head_dim)``, k/v ``(total_k, kv_heads, head_dim)`` (fp16, bf16 or
    fp32; ``heads % kv_heads == 0``; head_dim a multiple of 8 up to 256), cu_seqlens int32
    ``(batch + 1,)``. Returns ``out`` (q's dtype, q's shape) and, with ``return_lse``, also
    the fp32 log-sum-exp ``(heads, total_q)`` (``-inf`` for rows that see no key).
    Differentiable in q, k and v. CUDA tensors run the Triton kernels, CPU tensors the
    blockwise PyTorch implementation (or the kernels under ``TRITON_INTERPRET=1``).
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    max_seqlen_q, max_seqlen_k = operator.index(max_seqlen_q), operator.index(max_seqlen_k)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    left, right = window_size
    window_left = left if left >= 0 else UNBOUNDED
    window_right = 0 if causal else (right if right >= 0 else UNBOUNDED)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))

    backend = select_backend(q.device)
    if backend == "triton":
        out, lse = TritonVarlenAttention.apply(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right
        )
    else:
        out, lse = BlockwiseAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right)
    return (out, lse) if return_lse else out


def compile_specs() -> list[CompileSpec]:
    """Every (kernel, dtype, head_dim) build the launchers may pick on sm_90 and sm_80, for the compile report.

    A config both tile tables share is one spec for both targets. Pointers and the token/head
    strides (multiples of head_dim, so of 16 here) are declared aligned, as the Triton JIT
    specializes them at launch: without that hint the loads are neither vectorized nor pipelined.
    """
    specs = []
    for dtype, ty in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        hot = dtype != torch.float32  # training runs bf16/fp16; fp32 is the exact-but-slow path
        for head_dim in (64, 96, 128, 256):
            by_table = {table: _configs(head_dim, dtype, table) for table in sorted(TILES, reverse=True)}
            shared = {"HEAD_DIM": head_dim, "BLOCK_D": _block_d(head_dim)}
            dot = {"DOT_PRECISION": _dot_precision(dtype)}
            for name, fn, pointers in (
                ("fwd", _attn_fwd, ("Q", "K", "V", "Out")),
                ("dkdv", _attn_bwd_dkdv, ("Q", "K", "V", "DO", "DK", "DV")),
                ("dq", _attn_bwd_dq, ("Q", "K", "V", "DO", "DQ")),
            ):
                archs_of_config = {}
                for table, cfgs in by_table.items():
                    archs_of_config.setdefault(tuple(cfgs[name].items()), []).append(table)
                for config, archs in archs_of_config.items():
                    cfg = dict(config)
                    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                    constexprs = {**shared, **cfg, **dot}
                    signature = _signature(fn, pointers, ty, constexprs)
                    specs.append(
                        CompileSpec(
                            name=f"attention_{name}_{ty}_d{head_dim}",
                            fn=fn,
                            signature=signature,
                            constexprs=constexprs,
                            num_warps=warps,
                            num_stages=stages,
                            hot=hot,
                            archs=tuple(archs),
                            aligned=_aligned(signature),
                        )
                    )
            constexprs = {**shared, "BLOCK_M": DELTA_BLOCK_M}
            signature = _signature(_attn_bwd_delta, ("Out", "DO"), ty, constexprs)
            specs.append(
                CompileSpec(
                    name=f"attention_delta_{ty}_d{head_dim}",
                    fn=_attn_bwd_delta,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=4,
                    num_stages=1,
                    hot=False,
                    aligned=_aligned(signature),
                )
            )
    return specs


def _aligned(signature: dict[str, str]) -> tuple[str, ...]:
    """Pointers and token/head strides (multiples of head_dim); lse/delta rows are strided by total_q."""
    return tuple(
        name
        for name, ty in signature.items()
        if ty.startswith("*") or (name.startswith("stride_") and name not in ("stride_lh", "stride_dh"))
    )


def _signature(fn, data_pointers, ty: str, constexprs: dict) -> dict[str, str]:
    """Triton type strings for ``fn``'s arguments: data pointers in ``ty``, lse/delta fp32."""
    types = {}
    for name in fn.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in data_pointers:
            types[name] = f"*{ty}"
        elif name in ("Lse", "Delta"):
            types[name] = "*fp32"
        elif name.startswith("cu_seqlens"):
            types[name] = "*i32"
        elif name in ("qk_scale_log2", "softmax_scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types
