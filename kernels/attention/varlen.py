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

Scheduling: a program works on one tile, a (query block, head) of one sequence in the forward
and ``dq`` passes, a (key block, kv head) in ``dk``/``dv``. The launch is one-dimensional,
exactly as many programs as tiles times heads, and each program reads its (sequence, block)
from a tile table: every block of every sequence, the ones that visit the most key (query)
blocks first, so the long causal tiles of a long document start early instead of last. The
table is built on the host from the lengths once per batch (:class:`BatchPlan`, cached on the
``cu_seqlens`` tensors, which is also where their contents are validated): every further call
with the same ``cu_seqlens`` tensors, e.g. the next layer, reads nothing back from the GPU.

Forward: each program streams the key blocks its rows may see with an online softmax in base 2
(``exp2``, the scale and ``log2(e)`` folded into one multiply-add on the raw scores),
accumulating in fp32. Blocks outside the causal/window band are never visited; the blocks on
its edges (or at the sequence end) run in a separate loop that evaluates the mask (the constexpr
``MASKED`` stage, as in Triton's fused-attention tutorial), the blocks inside it in a loop
without one (fp32, whose FMA dots hold more in registers, runs one loop with a branch instead).

Backward (recompute, nothing of size ``T x T`` is stored), with ``dO`` the output gradient::

    delta_i = dO_i . o_i - dlse_i                 (dlse: the gradient of a loss that also reads lse)
    p_ij = exp(s_ij - lse_i),   dp_ij = dO_i . v_j,   ds_ij = p_ij (dp_ij - delta_i)
    dv_j = sum_i p_ij dO_i,     dk_j = scale sum_i ds_ij q_i,     dq_i = scale sum_j ds_ij k_j

``dk``/``dv`` come from one program per (key block, kv head) that runs one loop over the (query
head, query block) pairs of its GQA group that see it (the loads stay pipelined across heads). Per
visited (query block, key block) pair it runs four GEMMs: ``s^T = k q^T`` (recomputed),
``dv += p^T dO``, ``dp^T = v dO^T``, ``dk += ds^T q``.
``dq`` needs ``ds`` summed over key blocks, which live in other programs; two backward paths:

- ``deterministic=True`` (the default of :func:`varlen_attention` and of our
  ``flash_attn_varlen_func``): a second kernel over (query block, head) recomputes ``s`` and
  ``dp`` for its rows and adds ``dq += ds k`` in registers, key block after key block: three more
  GEMMs, 7 in all (1.4x the 5-GEMM minimum), no atomics. Every sum runs in a fixed order inside
  one program, so gradients are bitwise reproducible and a sequence's are the same alone or packed.
- ``deterministic=False`` (the ``ATOMIC_DQ`` build of the same dk/dv kernel): each program also
  computes its pair's share ``scale ds k`` (``BLOCK_M x d``, the fifth GEMM, in GEMMs of at most 32
  rows) for each query head of its group and adds it into a zeroed fp32 ``(total_q, heads, d)``
  buffer, on the rows of its own sequence only; masked keys and rows add 0. bf16/fp16 add each
  GEMM's rows through a tensor descriptor (``desc.atomic_add``: on sm_90 one TMA bulk reduction from
  shared memory, no per-element addresses in registers), fp32 with ``tl.atomic_add`` (relaxed). No
  dq kernel runs; the buffer is cast to q's dtype at the end. 5 GEMMs, as FlashAttention 2/3's
  backward, at the cost of ``(key blocks seen) x d`` fp32 atomics per query row and head and a
  ``4 * total_q * heads * d`` byte buffer. The order in which programs add into a row is whatever the GPU
  schedules, and fp32 addition is not associative: ``dq`` differs in its last bits from run to run
  and with what is packed beside a sequence (``dk``, ``dv`` and the forward stay deterministic). Use
  it when backward throughput matters more than bitwise reproducibility (benchmarks, exploratory
  runs); keep the default for training runs that must reproduce bit for bit (seed studies, resumed
  or re-run RL steps), for debugging and for tests that compare runs.
  ``torch.use_deterministic_algorithms(True)`` selects the deterministic path whatever is asked. The
  blockwise PyTorch path (CPU) has no atomics either way.

Each kernel evaluates the mask only on the band's edge blocks (a branch: a second loop costs ~30
registers there, which spills at head_dim 128).

Tiles never span two sequences and tile shapes depend only on ``head_dim``, dtype and the GPU
generation (a table for sm_90's wgmma, one for the others), never on lengths, so a sequence's
outputs and gradients (the deterministic backward's) are bitwise the same alone or packed with
others (the tile order only changes when a program runs, not what it computes). GQA: query
head ``h`` reads kv head ``h // (heads // kv_heads)``.

Sizes: every pointer is a 64-bit base (sequence start, block start, head) plus a 32-bit offset
inside the tile, so sequences of any length and views with large token or head strides
(transformers' ``(batch, heads, T, d)`` transposed, a slice of a fused qkv projection) address
correctly; only a token stride over ``2**31 / 256`` elements is copied first. Window sides are
clamped to the longest query plus key length (a wider window changes nothing), which keeps the
range arithmetic inside int32.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

from ..backend import select_backend, tile_table
from ..utils.autograd import on_tensor_device, once_differentiable
from ..utils.checks import check_cu_seqlens, check_dim, check_same_device, check_tensor
from ..utils.descriptors import ensure_scratch_allocator
from .blockwise import BlockwiseAttention

LOG2E = tl.constexpr(math.log2(math.e))  # exp(x) = exp2(x * LOG2E); a constexpr so kernels read it too
MAX_HEAD_DIM = 256
MAX_SEQLEN = 2**31 - 1  # cu_seqlens are int32: no sequence can be longer
MAX_BAND = 2**30  # longest q_len + longest k_len: keeps the kernels' row/key arithmetic in int32
MAX_TOKEN_STRIDE = 2**31 // 256  # a tile spans at most 256 tokens of 32-bit offsets

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
def _tile(TileSeq, TileBlock, cu_seqlens_q, cu_seqlens_k, heads):
    """This program's tile: (sequence, block, head) and the sequence's query/key starts and lengths."""
    pid = tl.program_id(0)
    tile = pid // heads
    seq = tl.load(TileSeq + tile)
    q_start = tl.load(cu_seqlens_q + seq)
    k_start = tl.load(cu_seqlens_k + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_start
    k_len = tl.load(cu_seqlens_k + seq + 1) - k_start
    return tl.load(TileBlock + tile), pid % heads, q_start, q_len, k_start, k_len


@triton.jit
def _fwd_blocks(
    acc, row_sum, row_max, q, k_src, v_src, stride_kt, stride_vt, rows, q_len, k_len,
    qk_scale, window_left, window_right, start, end, full_lo, full_hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DESCRIBED: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks ``[start, end)``. ``MASKED``: blocks that may hold masked keys, the
    mask evaluated on those outside ``[full_lo, full_hi)`` (a row may see none of their keys; a branch, not
    a where on every block, which costs registers); else whole blocks every row sees."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        k = _head_rows(k_src, 0, start_n, k_len, 0, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D, DESCRIBED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # raw scores: the scale goes into exp2's argument
        if MASKED:
            s = s * qk_scale
            if (start_n < full_lo) | (start_n >= full_hi):
                allowed = _allowed(rows[:, None], start_n + offs_n[None, :], q_len, k_len, window_left, window_right)
                s = tl.where(allowed, s, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, 1))
            # a row with nothing allowed yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            p = tl.math.exp2(s - shift[:, None])
            rescale = tl.math.exp2(row_max - shift)
        else:  # every score is finite: max on the raw scores (scale > 0), one FFMA per score
            new_max = tl.maximum(row_max, tl.max(s, 1) * qk_scale)
            p = tl.math.exp2(s * qk_scale - new_max[:, None])
            rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        v = _head_rows(v_src, 0, start_n, k_len, 0, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D, DESCRIBED)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max
    return acc, row_sum, row_max


@triton.jit
def _attn_fwd(
    Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k, TileSeq, TileBlock,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    heads, group, qk_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out and lse for one (query block, head) tile."""
    q_block, head, q_start, q_len, k_start, k_len = _tile(TileSeq, TileBlock, cu_seqlens_q, cu_seqlens_k, heads)
    kv_head = head // group
    first_row = q_block * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = first_row + offs_m
    dims = tl.arange(0, BLOCK_D)
    tile_mask = (rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM)
    row_base = tl.cast(q_start + first_row, tl.int64)
    Q_tile = Q + row_base * stride_qt + tl.cast(head, tl.int64) * stride_qh
    q = tl.load(Q_tile + offs_m[:, None] * stride_qt + dims[None, :], mask=tile_mask, other=0.0)
    DESCRIBED: tl.constexpr = DOT_PRECISION != "ieee"
    k_src, v_src = _kv_sources(K, V, k_start, k_len, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
                               HEAD_DIM, BLOCK_N, BLOCK_D, DESCRIBED)  # fmt: skip

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of scale * s, in log2 units
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, hi = _key_ranges(first_row, last_row, q_len, k_len, window_left, window_right, BLOCK_N)
    stage = (q, k_src, v_src, stride_kt, stride_vt, rows, q_len, k_len, qk_scale, window_left, window_right)
    if DOT_PRECISION == "ieee":  # fp32's FMA dots: one loop, as a second one costs registers (spills)
        acc, row_sum, row_max = _fwd_blocks(acc, row_sum, row_max, *stage, lo, hi, full_lo, full_hi,
                                            HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PRECISION, DESCRIBED)  # fmt: skip
    else:  # edge blocks: [lo, full_lo) on the window's left edge, [full_hi, hi) the diagonal and sequence end
        acc, row_sum, row_max = _fwd_blocks(acc, row_sum, row_max, *stage, lo, full_lo, 0, 0,
                                            HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PRECISION, DESCRIBED)  # fmt: skip
        acc, row_sum, row_max = _fwd_blocks(acc, row_sum, row_max, *stage, full_lo, full_hi, full_lo, full_hi,
                                            HEAD_DIM, BLOCK_N, BLOCK_D, False, DOT_PRECISION, DESCRIBED)  # fmt: skip
        acc, row_sum, row_max = _fwd_blocks(acc, row_sum, row_max, *stage, full_hi, hi, 0, 0,
                                            HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PRECISION, DESCRIBED)  # fmt: skip

    out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    Out_tile = Out + row_base * stride_ot + tl.cast(head, tl.int64) * stride_oh
    tl.store(Out_tile + offs_m[:, None] * stride_ot + dims[None, :], out.to(Out.dtype.element_ty), mask=tile_mask)
    lse = (row_max + tl.math.log2(tl.where(row_sum == 0.0, 1.0, row_sum))) / LOG2E  # empty rows: -inf
    tl.store(Lse + tl.cast(head, tl.int64) * stride_lh + row_base + offs_m, lse, mask=rows < q_len)


@triton.jit
def _attn_bwd_delta(
    Out, DO, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_dh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O), fp32, one value per (head, token)."""
    first_row = tl.program_id(0) * BLOCK_M
    head = tl.cast(tl.program_id(1), tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (first_row + offs_m[:, None] < total_q) & (dims[None, :] < HEAD_DIM)
    row_base = tl.cast(first_row, tl.int64)
    O_tile = Out + row_base * stride_ot + head * stride_oh
    DO_tile = DO + row_base * stride_dot + head * stride_doh
    o = tl.load(O_tile + offs_m[:, None] * stride_ot + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO_tile + offs_m[:, None] * stride_dot + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head * stride_dh + row_base + offs_m, delta, mask=first_row + offs_m < total_q)


@triton.jit
def _head_rows(src, group_head, start, length, stride_h, stride_t,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DESCRIBED: tl.constexpr):
    """Rows ``[start, start + BLOCK_M)`` of query head ``group_head`` of a GQA group, zero past ``length`` and
    ``HEAD_DIM``: ``DESCRIBED``, from a tensor descriptor ``[group, length, HEAD_DIM]``; else by masked loads
    from ``src``, a pointer to the group's first head."""
    if DESCRIBED:
        rows = src.load([group_head, start, 0]).reshape(BLOCK_M, BLOCK_D)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        base = src + tl.cast(group_head, tl.int64) * stride_h + tl.cast(start, tl.int64) * stride_t
        rows = tl.load(base + offs_m[:, None] * stride_t + dims[None, :],
                       mask=((start + offs_m) < length)[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    return rows


@triton.jit
def _kv_sources(K, V, k_start, k_len, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DESCRIBED: tl.constexpr):
    """What :func:`_head_rows` reads one kv head's keys and values of a sequence from: ``DESCRIBED``, tensor
    descriptors ``[1, k_len, HEAD_DIM]`` (see :func:`_attn_bwd_dkdv`); else pointers to their first row."""
    k_src = K + tl.cast(k_start, tl.int64) * stride_kt + tl.cast(kv_head, tl.int64) * stride_kh
    v_src = V + tl.cast(k_start, tl.int64) * stride_vt + tl.cast(kv_head, tl.int64) * stride_vh
    if DESCRIBED:
        keys = tl.maximum(k_len, 1)  # a descriptor dimension may not be 0
        k_src = tl.make_tensor_descriptor(k_src, shape=[1, keys, HEAD_DIM], strides=[stride_kh, stride_kt, 1],
                                          block_shape=[1, BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_src, shape=[1, keys, HEAD_DIM], strides=[stride_vh, stride_vt, 1],
                                          block_shape=[1, BLOCK_N, BLOCK_D])
    return k_src, v_src


@triton.jit
def _add_dq(DQ_head, dst, k, group_head, start_m, q_len, stride_dqt, softmax_scale,
            HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
            DESCRIBED: tl.constexpr):  # fmt: skip
    """Adds ``scale ds k`` for query rows ``[start_m, start_m + ROWS)`` (``dst``: their ``ds^T``, key-major) into the
    fp32 dq rows: ``DESCRIBED``, ``DQ_head`` is a descriptor of the group's rows, ``[1, ROWS, BLOCK_D]`` blocks; else
    a pointer to this head's rows, for atomics. Masked keys and rows have ds = 0: they add nothing."""
    dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION) * softmax_scale  # (ROWS, BLOCK_D)
    if DESCRIBED:  # a bulk reduction (TMA on sm_90): no per-element addresses; rows past q_len are dropped
        DQ_head.atomic_add([group_head, start_m, 0], dq.reshape(1, ROWS, BLOCK_D))
    else:  # relaxed: nothing reads dq before the kernel ends, so no ordering is needed, only atomicity
        offs = tl.arange(0, ROWS)
        dims = tl.arange(0, BLOCK_D)
        tl.atomic_add(DQ_head + tl.cast(start_m, tl.int64) * stride_dqt + offs[:, None] * stride_dqt + dims[None, :], dq,
                      mask=((start_m + offs) < q_len)[:, None] & (dims < HEAD_DIM)[None, :], sem="relaxed")


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_src, do_src, group, Lse_group, Delta_group, DQ_group, stride_qh, stride_qt, stride_doh,
    stride_dot, stride_dqt, stride_dqh, stride_lh, cols,
    q_len, k_len, qk_scale, softmax_scale, window_left, window_right, lo, full_lo, full_hi, hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DQ_ROWS: tl.constexpr, DESCRIBED: tl.constexpr,
):  # fmt: skip
    """Adds the query blocks ``[lo, hi)`` of every query head of the GQA group (``q_src`` / ``do_src``; ``Lse_group``,
    ``Delta_group``: the group's first head) to dk and dv (transposed scores: key-major); only blocks outside
    ``[full_lo, full_hi)`` evaluate the mask. One loop over (head, block) pairs, not a loop per head: the loads
    stay pipelined across heads, and the compiled loop holds fewer registers. ``ATOMIC_DQ``: also adds this key
    block's share of dq (the fifth GEMM) into fp32 dq rows, ``DQ_ROWS`` query rows per GEMM (:func:`_add_dq`;
    ``DQ_group``: a descriptor of the group's rows, or a pointer to its first head's)."""
    span = tl.cdiv(hi - lo, BLOCK_M) * BLOCK_M  # query rows one head visits (none when hi <= lo)
    for step in range(0, group * span, BLOCK_M):
        group_head = step // span
        start_m = lo + step - group_head * span
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q = _head_rows(q_src, group_head, start_m, q_len, stride_qh, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D, DESCRIBED)
        do = _head_rows(do_src, group_head, start_m, q_len, stride_doh, stride_dot, HEAD_DIM, BLOCK_M, BLOCK_D,
                        DESCRIBED)  # fmt: skip
        head_offset = tl.cast(group_head, tl.int64) * stride_lh  # (heads, total_q): may pass 2**31 elements
        lse_log2 = tl.load(Lse_group + head_offset + rows, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(Delta_group + head_offset + rows, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M): s transposed, unscaled
        pt = tl.math.exp2(st * qk_scale - lse_log2[None, :])
        if (start_m < full_lo) | (start_m >= full_hi):  # where, not -inf scores: rows with lse = -inf give 0
            pt = tl.where(_allowed(rows[None, :], cols[:, None], q_len, k_len, window_left, window_right), pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            DQ_head = DQ_group if DESCRIBED else DQ_group + tl.cast(group_head, tl.int64) * stride_dqh
            if DQ_ROWS == BLOCK_M:
                _add_dq(DQ_head, dst, k, group_head, start_m, q_len, stride_dqt, softmax_scale, HEAD_DIM, DQ_ROWS,
                        BLOCK_D, DOT_PRECISION, DESCRIBED)  # fmt: skip
            else:  # two halves: only half of dq's fp32 accumulator is live at a time
                tl.static_assert(2 * DQ_ROWS == BLOCK_M)
                first, second = tl.split(tl.permute(dst.reshape(dst.shape[0], 2, DQ_ROWS), (0, 2, 1)))
                _add_dq(DQ_head, first, k, group_head, start_m, q_len, stride_dqt, softmax_scale, HEAD_DIM, DQ_ROWS,
                        BLOCK_D, DOT_PRECISION, DESCRIBED)  # fmt: skip
                _add_dq(DQ_head, second, k, group_head, start_m + DQ_ROWS, q_len, stride_dqt, softmax_scale, HEAD_DIM,
                        DQ_ROWS, BLOCK_D, DOT_PRECISION, DESCRIBED)  # fmt: skip
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, DQ, cu_seqlens_q, cu_seqlens_k, TileSeq, TileBlock,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_dqt, stride_dqh, stride_lh,
    kv_heads, group, qk_scale, softmax_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):  # fmt: skip
    """dk, dv for one (key block, kv head) tile: sums over every query head of its group. ``ATOMIC_DQ``
    (``deterministic=False``): also adds the tile's share of dq for each of those heads to the fp32
    buffer ``DQ`` (zeroed by the launcher) with atomics, and no dq kernel runs; else ``DQ`` is unused."""
    k_block, kv_head, q_start, q_len, k_start, k_len = _tile(TileSeq, TileBlock, cu_seqlens_q, cu_seqlens_k,
                                                             kv_heads)  # fmt: skip
    first_col = k_block * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    cols = first_col + offs_n
    dims = tl.arange(0, BLOCK_D)
    tile_mask = (cols[:, None] < k_len) & (dims[None, :] < HEAD_DIM)
    col_base = tl.cast(k_start + first_col, tl.int64)
    kv_head64 = tl.cast(kv_head, tl.int64)
    k = tl.load(K + col_base * stride_kt + kv_head64 * stride_kh + offs_n[:, None] * stride_kt + dims[None, :],
                mask=tile_mask, other=0.0)  # fmt: skip
    v = tl.load(V + col_base * stride_vt + kv_head64 * stride_vh + offs_n[:, None] * stride_vt + dims[None, :],
                mask=tile_mask, other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    last_col = tl.minimum(first_col + BLOCK_N, k_len) - 1
    lo, full_lo, full_hi, hi = _query_ranges(first_col, last_col, q_len, k_len, window_left, window_right, BLOCK_M)
    q_base = tl.cast(q_start, tl.int64)
    first_head = tl.cast(kv_head * group, tl.int64)
    q_src = Q + q_base * stride_qt + first_head * stride_qh  # the group's first query head in this sequence
    do_src = DO + q_base * stride_dot + first_head * stride_doh
    DESCRIBED: tl.constexpr = DOT_PRECISION != "ieee"
    # dq (ATOMIC_DQ) in GEMMs of at most 32 query rows: a 64-row tile's 64 x d fp32 dq beside dk and dv spills
    # (sm_90, head_dim 128), and two halves on mma.sync free its registers for pipelined loads
    DQ_ROWS: tl.constexpr = min(BLOCK_M, 32)
    if DESCRIBED:
        # q and do of the group as [group, q_len, HEAD_DIM] (rows past q_len, dims past HEAD_DIM read as zero;
        # a dimension may not be 0, and with q_len = 0 no block is read). On sm_90 the loads are TMA copies,
        # which hold no per-element addresses in registers: the 64 x 128 tile fits without spills. fp32's FMA
        # dots keep masked loads: the descriptors' lowering without TMA spills their tiles
        rows_described = tl.maximum(q_len, 1)
        q_src = tl.make_tensor_descriptor(q_src, shape=[group, rows_described, HEAD_DIM],
                                          strides=[stride_qh, stride_qt, 1], block_shape=[1, BLOCK_M, BLOCK_D])
        do_src = tl.make_tensor_descriptor(do_src, shape=[group, rows_described, HEAD_DIM],
                                           strides=[stride_doh, stride_dot, 1], block_shape=[1, BLOCK_M, BLOCK_D])
        if ATOMIC_DQ:  # the group's dq rows, the same way
            dq_dst = tl.make_tensor_descriptor(DQ + q_base * stride_dqt + first_head * stride_dqh,
                                               shape=[group, rows_described, HEAD_DIM],
                                               strides=[stride_dqh, stride_dqt, 1], block_shape=[1, DQ_ROWS, BLOCK_D])
    if not (DESCRIBED and ATOMIC_DQ):
        dq_dst = DQ + q_base * stride_dqt + first_head * stride_dqh
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_src, do_src, group, Lse + first_head * stride_lh + q_base,
                          Delta + first_head * stride_lh + q_base, dq_dst, stride_qh, stride_qt, stride_doh, stride_dot,
                          stride_dqt, stride_dqh, stride_lh, cols, q_len, k_len, qk_scale, softmax_scale, window_left,
                          window_right, lo, full_lo, full_hi, hi, HEAD_DIM, BLOCK_M, BLOCK_D, DOT_PRECISION, ATOMIC_DQ,
                          DQ_ROWS, DESCRIBED)  # fmt: skip

    DK_tile = DK + col_base * stride_dkt + kv_head64 * stride_dkh
    DV_tile = DV + col_base * stride_dvt + kv_head64 * stride_dvh
    tl.store(DK_tile + offs_n[:, None] * stride_dkt + dims[None, :], (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=tile_mask)  # fmt: skip
    tl.store(DV_tile + offs_n[:, None] * stride_dvt + dims[None, :], dv.to(DV.dtype.element_ty), mask=tile_mask)


@triton.jit
def _dq_blocks(
    dq, q, do, lse_log2, delta, k_src, v_src, stride_kt, stride_vt, rows, q_len, k_len,
    qk_scale, window_left, window_right, lo, full_lo, full_hi, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DESCRIBED: tl.constexpr,
):  # fmt: skip
    """Adds the key blocks ``[lo, hi)`` to dq; only those outside ``[full_lo, full_hi)`` evaluate the mask."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = _head_rows(k_src, 0, start_n, k_len, 0, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D, DESCRIBED)
        v = _head_rows(v_src, 0, start_n, k_len, 0, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D, DESCRIBED)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(s * qk_scale - lse_log2[:, None])
        if (start_n < full_lo) | (start_n >= full_hi):
            allowed = _allowed(rows[:, None], start_n + offs_n[None, :], q_len, k_len, window_left, window_right)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ, cu_seqlens_q, cu_seqlens_k, TileSeq, TileBlock,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    heads, group, qk_scale, softmax_scale, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq for one (query block, head) tile: streams the key blocks its rows see."""
    q_block, head, q_start, q_len, k_start, k_len = _tile(TileSeq, TileBlock, cu_seqlens_q, cu_seqlens_k, heads)
    kv_head = head // group
    first_row = q_block * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = first_row + offs_m
    dims = tl.arange(0, BLOCK_D)
    tile_mask = (rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM)
    row_base = tl.cast(q_start + first_row, tl.int64)
    head64 = tl.cast(head, tl.int64)
    q = tl.load(Q + row_base * stride_qt + head64 * stride_qh + offs_m[:, None] * stride_qt + dims[None, :],
                mask=tile_mask, other=0.0)  # fmt: skip
    do = tl.load(DO + row_base * stride_dot + head64 * stride_doh + offs_m[:, None] * stride_dot + dims[None, :],
                 mask=tile_mask, other=0.0)  # fmt: skip
    lse_log2 = tl.load(Lse + head64 * stride_lh + row_base + offs_m, mask=rows < q_len, other=0.0) * LOG2E
    delta = tl.load(Delta + head64 * stride_lh + row_base + offs_m, mask=rows < q_len, other=0.0)
    DESCRIBED: tl.constexpr = DOT_PRECISION != "ieee"
    k_src, v_src = _kv_sources(K, V, k_start, k_len, kv_head, stride_kt, stride_kh, stride_vt, stride_vh,
                               HEAD_DIM, BLOCK_N, BLOCK_D, DESCRIBED)  # fmt: skip
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    last_row = tl.minimum(first_row + BLOCK_M, q_len) - 1
    lo, full_lo, full_hi, hi = _key_ranges(first_row, last_row, q_len, k_len, window_left, window_right, BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse_log2, delta, k_src, v_src, stride_kt, stride_vt, rows, q_len, k_len, qk_scale,
                    window_left, window_right, lo, full_lo, full_hi, hi, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PRECISION,
                    DESCRIBED)  # fmt: skip

    DQ_tile = DQ + row_base * stride_dqt + head64 * stride_dqh
    tl.store(DQ_tile + offs_m[:, None] * stride_dqt + dims[None, :], (dq * softmax_scale).to(DQ.dtype.element_ty),
             mask=tile_mask)  # fmt: skip


# ----------------------------------------------------------------------------- configs


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, keyed on the padded head_dim (BLOCK_D) and the
# GPU's tile table, never on sequence lengths: tiles that compile without register spills
# (tools/compile_report.py, docs/compile_report.md). Timed once (benchmarks/results/nvidia-h200-2026-12-04-attention.md:
# an H200 with Triton 3.6, so dkdv's 32-row tiles below): bf16 head_dim 128, GQA 40/8, causal, documents <= 8K
# packed to 32K: fwd 408 TFLOP/s, bwd 257 (cuDNN 520 / 313, FlashAttention-2 282 / 202); RL batch 64K + 110 x 512:
# 498 / 280. The atomic backward (dkdv_atomic, 5 GEMMs) was slower than the deterministic 7-GEMM one there (218
# against 257 TFLOP/s) with its 32-row tiles; the 64-row tiles Triton >= 3.9 takes are still to be timed.
# sm_90 tiles are shaped for wgmma (HGMMA): Triton issues it for a dot whose result has a multiple
# of 64 rows and of 8 columns, with warps in whole warpgroups (num_warps % 4 == 0). The rows are
# BLOCK_M in fwd and dq and BLOCK_N in dkdv (its dots produce key-major tiles).
TILES = {
    80: {  # mma.sync (HMMA): sm_80 and every GPU other than sm_90
        64: {"fwd": (128, 64, 8, 3), "dkdv": (16, 64, 4, 3), "dq": (64, 32, 4, 3), "dkdv_atomic": (16, 64, 4, 3)},
        # dkdv_atomic at 128: 2 stages, as fp32's halved 16x32 tile spills on sm_90 with 3 (2 STL at 128 registers)
        128: {"fwd": (128, 32, 8, 3), "dkdv": (16, 64, 8, 3), "dq": (64, 32, 8, 3), "dkdv_atomic": (16, 64, 8, 2)},
        # dq at 256: 32 x 32 (32 x 16 spills once with k and v read through descriptors)
        256: {"fwd": (64, 32, 8, 2), "dkdv": (16, 32, 8, 2), "dq": (32, 32, 8, 2), "dkdv_atomic": (16, 32, 8, 2)},
    },
    90: {  # wgmma (HGMMA)
        # k and v (fwd, dq) and q and do (dkdv) arrive by TMA: no per-element addresses in registers, which is
        # what lets the fwd and dq tiles take 128 keys. Every wgmma is N >= 64 at head_dim 64-128.
        # dkdv_atomic adds dq in two 32-row halves on mma.sync (DQ_ROWS in _attn_bwd_dkdv): at head_dim 64 a 64 x 64
        # dq over two warpgroups would be m64n32, and at 96-128 the whole 64 x 128 fp32 dq beside dk and dv spills
        # with 2 stages (9 STL, 7 in the loop; 1 stage fits, 252 registers, a candidate for a GPU to time).
        # 64 x 64 on one warpgroup would reduce the same 16 KB dq tile for half the GEMM work; 128 x 64 and
        # 128 x 128 spilled (80 and 115 STL)
        64: {"fwd": (128, 128, 8, 3), "dkdv": (64, 128, 8, 2), "dq": (128, 128, 8, 2), "dkdv_atomic": (64, 128, 8, 2)},
        # dkdv at 128: 64 query rows x 128 keys (n64 scores) fit because q and do arrive by TMA (descriptors hold no
        # per-element addresses; with pointer loads this tile spilled and 32 rows, n32 scores, were the most), and
        # because one loop runs over the group's (head, block) pairs (a loop per head held 6 more registers, and
        # the atomic build's 3 spills). The atomic build takes the same tile (251 registers); its 32-row tile (n32
        # scores) stays for Triton before 3.9 (OLDER_TRITON_TILES). fwd takes 3 stages: 231,424 B of shared memory,
        # 1 KB under sm_90's 227 KB (223 registers); dq's 3 stages would need 263,192 B, so it keeps 2
        128: {"fwd": (128, 128, 8, 3), "dkdv": (64, 128, 8, 2), "dq": (128, 128, 8, 2), "dkdv_atomic": (64, 128, 8, 2)},
        # dkdv: 64-key tiles spill at head_dim 256 (two 64x256 fp32 accumulators), so it keeps mma.sync; dq takes
        # one warpgroup (64 x 64 on two would be n32) and 193 KB of shared memory (197,648 B), as fwd does
        256: {"fwd": (128, 64, 8, 2), "dkdv": (16, 32, 8, 2), "dq": (64, 64, 4, 2), "dkdv_atomic": (16, 32, 8, 2)},
    },
}
KERNELS = ("fwd", "dkdv", "dq", "dkdv_atomic")
# Triton before 3.9 allocates registers worse for the 64-row dkdv tiles at head_dim 96-128 on sm_90 (Triton 3.6,
# compiled offline: 16 STL in the loop, the atomic build 11 outside it): there the 32-row tiles stay, spill-free
# with that compiler
OLDER_TRITON_TILES = {90: {128: {"dkdv": (32, 128, 8, 2), "dkdv_atomic": (32, 128, 8, 2)}}}
NEWER_TRITON = (3, 9)


def _triton_version() -> tuple[int, int]:
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def _configs(head_dim: int, dtype: torch.dtype, table: int) -> dict[str, dict[str, int]]:
    """Launch configs per kernel from ``TILES[table]`` for head_dim and dtype."""
    block_d = _block_d(head_dim)
    tiles = TILES[80 if dtype == torch.float32 else table]  # fp32 runs ieee dots: no wgmma to shape for
    size = min(size for size in tiles if size >= block_d)
    configs = tiles[size]
    if dtype != torch.float32 and _triton_version() < NEWER_TRITON:
        configs = {**configs, **OLDER_TRITON_TILES.get(table, {}).get(size, {})}
    if dtype == torch.float32:  # fp32 tiles take twice the registers
        configs = {name: (max(16, m // 2), max(16, n // 2), w, st) for name, (m, n, w, st) in configs.items()}
    return {
        name: {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st} for name, (m, n, w, st) in configs.items()
    }


DELTA_BLOCK_M = 64


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


# ----------------------------------------------------------------------------- tile scheduler


def schedule(lens_q, lens_k, block: int, other_block: int, window: tuple[int, int], over_keys: bool = False):
    """The tile table: ``(2, tiles)`` int32, the sequence and block index of every tile, heaviest first.

    Tiles are the ``block``-row query blocks of each sequence (``over_keys``: its ``block``-key
    key blocks). A tile's weight is the number of ``other_block`` key (query) blocks its
    kernel visits, the same ``[lo, hi)`` ranges as ``_key_ranges`` / ``_query_ranges``;
    ties keep sequence order. ``window`` holds resolved, non-negative sides.
    """
    lens_q, lens_k = np.asarray(lens_q, dtype=np.int64), np.asarray(lens_k, dtype=np.int64)
    left, right = window
    major, other = (lens_k, lens_q) if over_keys else (lens_q, lens_k)
    blocks = -(-major // block)
    seq = np.repeat(np.arange(major.size), blocks)
    index = np.arange(seq.size) - np.repeat(np.cumsum(blocks) - blocks, blocks)
    first = index * block
    last = np.minimum(first + block, major[seq]) - 1
    position = (lens_k - lens_q)[seq]  # key position of query row 0
    if over_keys:
        lo = np.maximum(first - position - right, 0) // other_block * other_block
        hi = np.minimum(last - position + left + 1, other[seq])
    else:
        lo = np.maximum(first + position - left, 0) // other_block * other_block
        hi = np.minimum(last + position + right + 1, other[seq])
    weight = -(-np.maximum(hi - lo, 0) // other_block)
    order = np.argsort(-weight, kind="stable")
    return np.stack([seq[order], index[order]]).astype(np.int32)


class BatchPlan:
    """One batch's ``cu_seqlens`` read to the host once: validated lengths and the tile tables.

    :func:`batch_plan` caches it on the ``cu_seqlens`` tensors, so every layer of a step that
    passes the same tensors skips the read-back (a host sync) and the validation of their contents.
    """

    def __init__(self, lens_q: np.ndarray, lens_k: np.ndarray):
        self.lens_q, self.lens_k = lens_q, lens_k
        self.longest_q = int(lens_q.max(initial=0))
        self.longest_k = int(lens_k.max(initial=0))
        self._tables: dict[tuple, torch.Tensor] = {}

    def window(self, left: int, right: int) -> tuple[int, int]:
        """Window sides (-1: unbounded) clamped to the longest q_len + k_len, rounded up to 16:
        a key farther than that from its query's position is never in any sequence."""
        band = -(-(self.longest_q + self.longest_k + 1) // 16) * 16
        return tuple(band if side < 0 else min(side, band) for side in (left, right))

    def tiles(self, block: int, other_block: int, window: tuple[int, int], over_keys: bool, device) -> torch.Tensor:
        """The tile table of one kernel config on ``device`` (built on first use)."""
        key = (block, other_block, window, over_keys, device)
        if key not in self._tables:
            table = schedule(self.lens_q, self.lens_k, block, other_block, window, over_keys)
            self._tables[key] = torch.from_numpy(table).to(device)
        return self._tables[key]


PLAN_CACHE_SIZE = 16  # batches whose plans stay cached (a step's micro-batches, SP ranks' views)
_PLANS: OrderedDict[tuple[int, int], tuple] = OrderedDict()


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place version counter; None for inference tensors, which have none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _read_lengths(name: str, cu_seqlens: torch.Tensor, total: int) -> np.ndarray:
    """Validate one ``cu_seqlens`` on the host (the one read-back of a batch) and return its lengths."""
    host = cu_seqlens.detach().cpu()
    check_cu_seqlens(name, host, total)
    return np.diff(host.numpy().astype(np.int64))


def batch_plan(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int, total_k: int) -> BatchPlan:
    """The cached :class:`BatchPlan` of these ``cu_seqlens`` tensors, or a new one read from them.

    A cached plan is used only while both tensors are alive, unmodified (same version counter,
    storage and totals); inference tensors have no version counter and are read every call.
    """
    key = (id(cu_seqlens_q), id(cu_seqlens_k))
    versions = (_version(cu_seqlens_q), _version(cu_seqlens_k))
    identity = (cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr(), total_q, total_k, *versions)
    cached = _PLANS.get(key)
    if cached is not None:
        ref_q, ref_k, cached_identity, plan = cached
        if ref_q() is cu_seqlens_q and ref_k() is cu_seqlens_k and cached_identity == identity:
            _PLANS.move_to_end(key)
            return plan
    lens_q = _read_lengths("cu_seqlens_q", cu_seqlens_q, total_q)
    same = cu_seqlens_k is cu_seqlens_q and total_k == total_q
    lens_k = lens_q if same else _read_lengths("cu_seqlens_k", cu_seqlens_k, total_k)
    plan = BatchPlan(lens_q, lens_k)
    if None not in versions:
        _PLANS[key] = (weakref.ref(cu_seqlens_q), weakref.ref(cu_seqlens_k), identity, plan)
        while len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


# ----------------------------------------------------------------------------- launchers


def _launch_tiles(plan: BatchPlan, cfg: dict, window, over_keys: bool, device):
    """The tile table of one kernel: ``(tile_seq, tile_block, count)``."""
    block, other = (cfg["BLOCK_N"], cfg["BLOCK_M"]) if over_keys else (cfg["BLOCK_M"], cfg["BLOCK_N"])
    table = plan.tiles(block, other, window, over_keys, device)
    return table[0], table[1], table.shape[1]


def _describable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or an aligned copy when a tensor descriptor cannot describe it: descriptors (TMA on sm_90) need a
    16-byte aligned base and strides of whole 16-byte units (a view at an odd offset of its storage has not)."""
    size = t.element_size()
    if t.data_ptr() % 16 == 0 and all(stride * size % 16 == 0 for stride in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _described_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors a kernel is about to read through descriptors, each describable (:func:`_describable`), and
    the scratch allocator those descriptors need on a GPU."""
    ensure_scratch_allocator(tensors[0].device)
    return tuple(_describable(t) for t in tensors)


def _triton_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, plan, scale, window):
    total_q, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(heads, total_q, device=q.device, dtype=torch.float32)
    cfg = _configs(head_dim, q.dtype, tile_table(q.device))["fwd"]
    tile_seq, tile_block, tiles = _launch_tiles(plan, cfg, window, False, q.device)
    if tiles * heads > 0:
        k, v = _described_inputs(k, v)
        _attn_fwd[(tiles * heads,)](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_block,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            heads, heads // k.shape[1], scale * LOG2E.value, *window,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), DOT_PRECISION=_dot_precision(q.dtype), **cfg,
        )  # fmt: skip
    return out, lse


def _triton_backward(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, plan, scale, window, deterministic):
    """dq, dk, dv (``dlse``: lse's gradient, or None). ``deterministic``: the dkdv kernel, then the dq kernel (7 GEMMs per block pair, no atomics);
    else the dkdv kernel alone, adding dq into a zeroed fp32 buffer with atomics (5 GEMMs), cast at the end."""
    total_q, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    block_d = _block_d(head_dim)
    precision = _dot_precision(q.dtype)
    cfgs = _configs(head_dim, q.dtype, tile_table(q.device))
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    # the atomic path sums dq in fp32 over key blocks (and a GQA group's programs): rows no key sees stay 0
    dq = torch.empty_like(q) if deterministic else torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    delta = torch.empty_like(lse)
    if total_q * heads > 0:
        _attn_bwd_delta[(triton.cdiv(total_q, DELTA_BLOCK_M), heads)](
            out, do, delta, total_q, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
            HEAD_DIM=head_dim, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d,
        )  # fmt: skip
    if dlse is not None:  # d lse_i / d s_ij = p_ij: ds_ij = p_ij (dp_ij - delta_i + dlse_i)
        delta -= dlse
    common = (scale * LOG2E.value, scale, *window)
    cfg = cfgs["dkdv" if deterministic else "dkdv_atomic"]
    tile_seq, tile_block, tiles = _launch_tiles(plan, cfg, window, True, q.device)
    if tiles * kv_heads > 0:
        q_read, do_read = _described_inputs(q, do)
        _attn_bwd_dkdv[(tiles * kv_heads,)](
            q_read, k, v, do_read, lse, delta, dk, dv, dq, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_block,
            q_read.stride(0), q_read.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            do_read.stride(0), do_read.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            kv_heads, heads // kv_heads, *common,
            HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=precision, ATOMIC_DQ=not deterministic, **cfg,
        )  # fmt: skip
    if not deterministic:
        return dq.to(q.dtype), dk, dv
    cfg = cfgs["dq"]
    tile_seq, tile_block, tiles = _launch_tiles(plan, cfg, window, False, q.device)
    if tiles * heads > 0:
        k_read, v_read = _described_inputs(k, v)
        _attn_bwd_dq[(tiles * heads,)](
            q, k_read, v_read, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_block,
            q.stride(0), q.stride(1), k_read.stride(0), k_read.stride(1), v_read.stride(0), v_read.stride(1),
            do.stride(0), do.stride(1),
            dq.stride(0), dq.stride(1), lse.stride(0), heads, heads // kv_heads, *common,
            HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_PRECISION=precision, **cfg,
        )  # fmt: skip
    return dq, dk, dv


class TritonVarlenAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and lse; the backward recomputes the probabilities."""

    @staticmethod
    @on_tensor_device
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, plan, scale, window_left, window_right, deterministic):
        window = (window_left, window_right)
        out, lse = _triton_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, plan, scale, window)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (plan, scale, window, deterministic)
        ctx.set_materialize_grads(False)  # an output no loss reads gets None: no zeros made, no work on them
        return out, lse

    @staticmethod
    @once_differentiable("varlen_attention")
    @on_tensor_device
    def backward(ctx, do, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        if do is None:  # a loss of lse alone
            do = torch.zeros_like(out)
        do = do if do.stride(-1) == 1 and do.stride(0) < MAX_TOKEN_STRIDE else do.contiguous()
        dq, dk, dv = _triton_backward(do, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------- public op


def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softmax_scale) -> tuple[int, int]:
    """Checks on shapes, dtypes, devices and arguments: nothing here reads a tensor's contents. Returns
    ``window_size`` as two ints."""
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
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
        if cu.numel() < 1:
            raise ValueError(f"{name} must have at least one element (batch + 1), got 0")
        if cu.device != device:
            raise ValueError(f"{name} is on {cu.device} but the data is on {device}")
        if cu.numel() > 1 and cu.stride(0) != 1:  # the kernels index it as contiguous
            raise ValueError(f"{name} must be contiguous, got a view with stride {cu.stride(0)}: pass "
                             f"{name}.contiguous()")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got {cu_seqlens_q.numel()} "
            f"and {cu_seqlens_k.numel()} entries"
        )
    window = _checked_window(window_size)
    if softmax_scale is not None:
        try:
            scale = math.nan if isinstance(softmax_scale, (str, bytes)) else float(softmax_scale)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
            scale = math.nan
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"softmax_scale must be a finite number > 0 (or None: 1/sqrt(head_dim)), "
                             f"got {softmax_scale!r}")  # fmt: skip
    return window


def _checked_window(window_size) -> tuple[int, int]:
    """``window_size`` as two Python ints >= -1: any pair of integers (numpy's too); a bool is refused, not 0/1."""
    try:
        left, right = (None if isinstance(w, (bool, np.bool_)) else operator.index(w) for w in window_size)
    except (TypeError, ValueError):  # not a pair, or not integers
        left = right = None
    if left is None or right is None or left < -1 or right < -1:
        raise ValueError(f"window_size must be two ints >= -1 (-1: unbounded), got {window_size!r}")
    return left, right


def _check_max_seqlen(name: str, given, longest: int) -> int:
    """``max_seqlen_*``: an int between the longest sequence and the int32 limit of ``cu_seqlens``."""
    try:
        value = operator.index(given)  # ints, numpy ints and 0-d integer tensors
    except TypeError:
        value = None
    if value is None or not longest <= value <= MAX_SEQLEN:
        raise ValueError(f"{name} must be an int in [the longest sequence ({longest}), {MAX_SEQLEN}], got {given!r}")
    return value


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
    deterministic: bool = True,
):
    """Attention over packed sequences; see the module docstring for the math, masking and backward paths.

    q ``(total_q, heads, head_dim)``, k/v ``(total_k, kv_heads, head_dim)`` (fp16, bf16 or
    fp32; ``heads % kv_heads == 0``; head_dim a multiple of 8 up to 256), cu_seqlens int32
    ``(batch + 1,)``; ``softmax_scale`` a finite number > 0 (default ``1/sqrt(head_dim)``).
    Returns ``out`` (q's dtype, q's shape) and, with ``return_lse``, also the fp32
    log-sum-exp ``(heads, total_q)`` (``-inf`` for rows that see no key).
    Differentiable in q, k and v, through ``out`` and ``lse`` both (a loss may read lse, as when
    attention over parts of the keys is merged by their lse). CUDA tensors run the Triton kernels, CPU tensors the
    blockwise PyTorch implementation (or the kernels under ``TRITON_INTERPRET=1``).
    ``deterministic`` (default) runs the 7-GEMM backward: gradients are bitwise reproducible
    and independent of what is packed beside a sequence. ``deterministic=False`` runs the
    5-GEMM backward that adds dq with fp32 atomics (fewer FLOPs, one kernel fewer; dq's last
    bits vary from run to run), unless ``torch.use_deterministic_algorithms(True)`` is on. The
    blockwise PyTorch path is deterministic either way.
    The contents of ``cu_seqlens_q/k`` are read (and checked) once per pair of tensors: pass
    the same tensors to every layer of a step, and edit them (if at all) with PyTorch ops, which
    bump their version counter: writes PyTorch does not see (through ``.numpy()``, ``.data`` or
    DLPack) leave the cached plan stale. Inference tensors have no counter and are re-read on
    every call.
    """
    window_size = _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softmax_scale)
    if not isinstance(deterministic, bool):
        raise ValueError(f"deterministic must be a bool, got {deterministic!r}")
    # as PyTorch's own ops with a deterministic alternative: the global switch picks it
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    plan = batch_plan(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    _check_max_seqlen("max_seqlen_q", max_seqlen_q, plan.longest_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k, plan.longest_k)
    if plan.longest_q + plan.longest_k > MAX_BAND:
        raise ValueError(f"the longest query plus key sequence must be at most {MAX_BAND} tokens, "
                         f"got {plan.longest_q} + {plan.longest_k}")  # fmt: skip
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    window_left, window_right = plan.window(window_size[0], 0 if causal else window_size[1])
    # the kernels take 32-bit offsets inside a tile: unit head-dim stride, token strides below the limit
    q, k, v = (t if t.stride(-1) == 1 and t.stride(0) < MAX_TOKEN_STRIDE else t.contiguous() for t in (q, k, v))

    backend = select_backend(q.device)
    if backend == "triton":
        out, lse = TritonVarlenAttention.apply(
            q, k, v, cu_seqlens_q, cu_seqlens_k, plan, scale, window_left, window_right, deterministic
        )
    else:
        out, lse = BlockwiseAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window_left, window_right)
    return (out, lse) if return_lse else out
