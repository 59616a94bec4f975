"""Fused LM head: per-token log-probs, entropy and mean log-prob without the T x V logits.

For hidden states ``h`` (T, d), head weight ``W`` (V, d), temperature ``tau`` and target ``t``:

    z = h W^T / tau                     logits, one (BLOCK_T, BLOCK_V) tile at a time, fp32
    L = logsumexp_j z_j                 online over vocabulary tiles (running max m)
    logp_t = z_t - L
    H = -sum_j p_j log p_j = log s - a / s,   s = sum_j e^(z_j - m),  a = sum_j e^(z_j - m) (z_j - m)
    mean_logp = (1/V) sum_j z_j - L     (label smoothing needs it)

``a`` is carried relative to the running max (``a <- e^(m - m') (a + (m - m') s)``), so
the entropy never subtracts two numbers of the logits' size: logits of 1e4 stay accurate.

The forward splits the vocabulary into at most ``VOCAB_SPLITS`` slices: one program per (token tile,
slice) merges the statistics of its slice, and ``_combine_kernel`` merges the slices of each row in
slice order. The grid fills the GPU even when few rows are valid (an RL batch's 4K response tokens
are 32 tiles of 128: 32 programs without slices, 256 with), and programs run slice-fastest, so the
ones resident together share a few hidden tiles and a few weight tiles in L2 instead of each
streaming its own hidden rows.

Only rows that count are computed. Rows whose target is ``ignore_index`` (in RL: every prompt
token) are never loaded: the valid rows are listed first in ``order`` (a stable sort on the
device) and ``num_valid`` stays a device tensor, so there is no host synchronisation. Every
grid has a fixed size computed from T, and a program whose rows lie past ``num_valid`` returns
at once. Ignored rows get 0 outputs and exactly zero gradient, whatever their inputs hold (a
NaN hidden row at a prompt position cannot reach anything).

Backward recomputes each logits tile once, in chunks of ``TOKEN_CHUNK`` valid rows by
``VOCAB_CHUNK`` vocabulary columns:

    dz_j = g_logp (1[j = t] - p_j)  -  g_H p_j (log p_j + H)  +  g_mean (1/V - p_j)     (times 1/tau)
    dh[chunk rows] (+)= dz W[chunk cols],   dW[chunk cols] (+)= dz^T h[chunk rows]

``_dlogits_kernel`` writes dz once, in the input dtype, to a fixed-size chunk buffer; two GEMM
kernels read it (bf16/fp16: through tensor descriptors, TMA on sm_90, as they read the weight rows;
on sm_90 that took the first chunk's builds from 172 to 128 registers (d(hidden)) and 142 to 106
(d(weight)), with fewer instructions. The logits kernels keep masked loads for the weight: with
descriptors they reached 234-255 registers from 212-233). The vocabulary chunks are the outer loop: d(weight) rows are summed in fp32 over
the token chunks in one chunk buffer and written in the weight's dtype at the last one, d(hidden)
rows in an fp32 buffer of the valid rows (read and rewritten once per vocabulary chunk) and written
at the last. Each sum runs in a fixed order, so both gradients are bitwise reproducible without
atomics, and the extra memory is 4 T_valid d bytes plus chunk buffers, never an fp32 copy of the
weight. Forward + backward issue 8 T_valid d V FLOPs (2 + 2 + 2 + 2).

Scalar losses can skip the recompute (:func:`fused_linear_loss`, behind ``grad_in_forward`` of
``linear_cross_entropy`` and ``grpo_loss``): the forward runs per chunk of LOGITS_TOKEN_CHUNK valid
rows, keeps that chunk's fp32 logits, takes the per-token output gradients from the loss through
autograd and feeds dz from the kept logits to the same GEMM kernels: 6 T_valid d V FLOPs, for an
fp32 LOGITS_TOKEN_CHUNK x V buffer of memory (and, its token chunks being the outer loop, fp32 sums of
d(weight) when more than one chunk holds valid rows).
Tile and chunk sizes depend on d and dtype only, never on T, and every row is computed
independently of the others, so a token's outputs and hidden gradient are the same bits alone or
inside any batch. CPU tensors take the chunked PyTorch path (:mod:`.chunked`) unless the Triton
interpreter is on.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch
import triton
import triton.language as tl

from ..backend import requested_backend, select_backend, tile_table
from ..utils.autograd import on_tensor_device, once_differentiable, token_loss_gradients
from ..utils.checks import FLOAT_DTYPES, check_same_device, check_tensor, tensor_checks_enabled
from ..utils.descriptors import ensure_scratch_allocator
from . import chunked, cuda_backend
from .valid_rows import LM_HEAD_OPS, ValidRowLoss, ValidRowStats, scaled_gradients

TOKEN_CHUNK = 4096  # valid rows per backward chunk (dz buffer: TOKEN_CHUNK x VOCAB_CHUNK in the input dtype)
VOCAB_CHUNK = 8192
# valid rows per chunk when gradients are made in the forward (fp32 logits kept: LOGITS_TOKEN_CHUNK x V)
LOGITS_TOKEN_CHUNK = 2048
# vocabulary slices of the forward (a constant, so a row's merge order never depends on its batch)
VOCAB_SPLITS = 8
# fp32 partial statistics per (row, slice): max, sum of exponentials, entropy term, logit sum, target logit
PARTIAL_STATS = 5
COMBINE_BLOCK = 128  # rows per program of the slice merge
# the backends launched from the host, by the name select_backend returns (Triton: the kernels below)
HOST_BACKENDS = {"torch": chunked, "cuda": cuda_backend}
FP32_MAX = torch.finfo(torch.float32).max  # the largest 1 / temperature the kernels' fp32 scale holds


@triton.jit
def _valid_rows(order_ptr, num_valid, start, BLOCK: tl.constexpr):
    """Row indices of positions ``start + [0, BLOCK)`` of the compacted order, and which of them exist."""
    positions = start + tl.arange(0, BLOCK)
    row_in = positions < num_valid
    rows = tl.load(order_ptr + positions, mask=row_in, other=0)
    return rows, row_in


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_in, col_in, D, inv_temperature,
                 BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                 MASK_COLS: tl.constexpr = True):
    """fp32 (BLOCK_T, BLOCK_V) tile of h W^T / tau; masked rows and columns read as zero (``MASK_COLS=False``:
    every column exists, ``col_in`` is not read)."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_in = dims < D
        h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=row_in[:, None] & dim_in[None, :], other=0.0)
        if MASK_COLS:
            w_in = col_in[:, None] & dim_in[None, :]
        else:
            w_in = dim_in[None, :]
        w = tl.load(weight_ptr + cols[:, None] * D + dims[None, :], mask=w_in, other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    return acc * inv_temperature


@triton.jit
def _forward_tile(running_max, sum_exp, shifted_sum, logit_sum, target_logit,
                  hidden_ptr, weight_ptr, logits_dst, rows, row_in, local_rows, first_row, target, D, logits_stride,
                  inv_temperature, v0, num_cols,
                  WITH_ENTROPY: tl.constexpr, WITH_MEAN: tl.constexpr, STORE_LOGITS: tl.constexpr,
                  LOGITS_BY_DESCRIPTOR: tl.constexpr, MASKED: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Merges the logits tile of columns ``v0 + [0, BLOCK_V)`` into the running statistics. ``MASKED``: the
    tile reaches past ``num_cols`` (a column mask on every step); else every column exists, and no mask
    is built (the registers it takes push the 128 x 128 tile into spills). ``STORE_LOGITS``: also stores the
    tile into ``logits_dst``, a tensor descriptor of the kept logits (``LOGITS_BY_DESCRIPTOR``) or a pointer."""
    cols = v0 + tl.arange(0, BLOCK_V)
    col_in = cols < num_cols
    z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_in, col_in, D, inv_temperature,
                     BLOCK_T, BLOCK_V, BLOCK_D, PRECISION, MASKED)  # fmt: skip
    if STORE_LOGITS:
        if LOGITS_BY_DESCRIPTOR:  # one TMA copy on sm_90; columns past the slice are dropped by it
            logits_dst.store([first_row, v0], z)
        elif MASKED:
            tl.store(logits_dst + local_rows[:, None] * logits_stride + cols[None, :], z, mask=col_in[None, :])
        else:
            tl.store(logits_dst + local_rows[:, None] * logits_stride + cols[None, :], z)
    if WITH_MEAN:  # masked-off columns have z = 0 (zero weight rows): nothing to mask
        logit_sum += tl.sum(z, axis=1)
    # the target's offset in the tile against a constant iota (no column vector held for the compare); a
    # target in a later slice may point past num_cols, where z is 0
    target_logit += tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == (target - v0)[:, None], z, 0.0), axis=1)
    if MASKED:  # columns past the end: a finite floor, whose exp is 0 (and 0 * shifted stays 0). One where, not
        z = tl.where(col_in[None, :], z, -3.0e38)  # one for the max and one for the exps: 3 spills fewer at 128 rows
    new_max = tl.maximum(running_max, tl.max(z, axis=1))
    rescale = tl.exp(running_max - new_max)
    shifted = z - new_max[:, None]
    exps = tl.exp(shifted)
    if WITH_ENTROPY:
        shifted_sum = rescale * (shifted_sum + (running_max - new_max) * sum_exp) + tl.sum(exps * shifted, axis=1)
    sum_exp = rescale * sum_exp + tl.sum(exps, axis=1)
    return new_max, sum_exp, shifted_sum, logit_sum, target_logit


@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, targets_ptr, order_ptr, num_valid_ptr, partial_ptr, logits_ptr,
                    token_start, partial_stride, logits_rows, logits_stride, V, D, split_cols, num_splits,
                    inv_temperature, WITH_ENTROPY: tl.constexpr, WITH_MEAN: tl.constexpr, STORE_LOGITS: tl.constexpr,
                    LOGITS_BY_DESCRIPTOR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One program per BLOCK_T valid rows (from position ``token_start`` of the compacted order) and
    vocabulary slice ``[split * split_cols, (split + 1) * split_cols)``, slice index fastest: online
    logsumexp, entropy and sums over the slice's tiles, stored as partial statistics
    ``partial[stat, split, row]`` for :func:`_combine_kernel`. ``STORE_LOGITS`` also keeps the fp32
    logits of these rows in a (logits_rows, logits_stride) chunk buffer, for gradients computed without a
    recompute (``LOGITS_BY_DESCRIPTOR``: through a tensor descriptor, which on sm_90 stores each tile with one
    TMA copy: no per-element addresses in registers, which lets this forward take 128 rows)."""
    split = tl.program_id(0) % num_splits  # one axis (no 65,535 limit on tiles), slice index fastest
    tile = tl.program_id(0) // num_splits
    num_valid = tl.load(num_valid_ptr)
    start = token_start + tile.to(tl.int64) * BLOCK_T
    if start >= num_valid:
        return
    rows, row_in = _valid_rows(order_ptr, num_valid, start, BLOCK_T)
    local_rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    target = tl.load(targets_ptr + rows, mask=row_in, other=0)
    running_max = tl.full((BLOCK_T,), -3.0e38, dtype=tl.float32)  # finite: (m - m') * 0 stays 0
    sum_exp = tl.zeros((BLOCK_T,), dtype=tl.float32)
    shifted_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_T,), dtype=tl.float32)
    # the slice as a vocabulary of its own: columns, weight rows, kept logits and target relative to its start
    vocab_start = split * split_cols  # int32, as the columns (an int64 loop bound makes every column int64)
    slice_cols = tl.minimum(split_cols, V - vocab_start)
    weight_ptr += vocab_start.to(tl.int64) * D
    logits_ptr += vocab_start
    target = (target - vocab_start).to(tl.int32)
    # whole tiles without a column mask, then the slice's partial last tile (if any) with one
    full_cols = slice_cols // BLOCK_V * BLOCK_V
    stats = (running_max, sum_exp, shifted_sum, logit_sum, target_logit)
    logits_dst = logits_ptr
    if STORE_LOGITS and LOGITS_BY_DESCRIPTOR:
        logits_dst = tl.make_tensor_descriptor(logits_ptr, shape=[logits_rows, slice_cols], strides=[logits_stride, 1],
                                               block_shape=[BLOCK_T, BLOCK_V])  # fmt: skip
    stage = (hidden_ptr, weight_ptr, logits_dst, rows, row_in, local_rows, tile * BLOCK_T, target, D, logits_stride,
             inv_temperature)
    for v0 in range(0, full_cols, BLOCK_V):
        stats = _forward_tile(*stats, *stage, v0, slice_cols, WITH_ENTROPY, WITH_MEAN, STORE_LOGITS,
                              LOGITS_BY_DESCRIPTOR, False, BLOCK_T, BLOCK_V, BLOCK_D, PRECISION)  # fmt: skip
    if full_cols < slice_cols:
        stats = _forward_tile(*stats, *stage, full_cols, slice_cols, WITH_ENTROPY, WITH_MEAN, STORE_LOGITS,
                              LOGITS_BY_DESCRIPTOR, True, BLOCK_T, BLOCK_V, BLOCK_D, PRECISION)  # fmt: skip
    running_max, sum_exp, shifted_sum, logit_sum, target_logit = stats
    out = partial_ptr + split * partial_stride + rows
    plane = num_splits * partial_stride
    tl.store(out, running_max, mask=row_in)
    tl.store(out + plane, sum_exp, mask=row_in)
    if WITH_ENTROPY:
        tl.store(out + 2 * plane, shifted_sum, mask=row_in)
    if WITH_MEAN:
        tl.store(out + 3 * plane, logit_sum, mask=row_in)
    tl.store(out + 4 * plane, target_logit, mask=row_in)


@triton.jit
def _combine_kernel(order_ptr, num_valid_ptr, partial_ptr, logp_ptr, entropy_ptr, mean_logp_ptr, lse_ptr,
                    token_start, partial_stride, num_splits, V,
                    WITH_ENTROPY: tl.constexpr, WITH_MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """Merges each row's partial statistics over the vocabulary slices, in slice order (moving both sides
    to the larger max, as the forward does per tile), into logp, entropy, mean_logp and lse."""
    num_valid = tl.load(num_valid_ptr)
    start = token_start + tl.program_id(0).to(tl.int64) * BLOCK
    if start >= num_valid:
        return
    rows, row_in = _valid_rows(order_ptr, num_valid, start, BLOCK)
    plane = num_splits * partial_stride
    running_max = tl.full((BLOCK,), -3.0e38, dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK,), dtype=tl.float32)
    shifted_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(num_splits):
        part = partial_ptr + split * partial_stride + rows
        part_max = tl.load(part, mask=row_in, other=-3.0e38)
        part_sum = tl.load(part + plane, mask=row_in, other=0.0)
        new_max = tl.maximum(running_max, part_max)
        rescale, part_rescale = tl.exp(running_max - new_max), tl.exp(part_max - new_max)
        if WITH_ENTROPY:
            part_shifted = tl.load(part + 2 * plane, mask=row_in, other=0.0)
            shifted_sum = (rescale * (shifted_sum + (running_max - new_max) * sum_exp)
                           + part_rescale * (part_shifted + (part_max - new_max) * part_sum))
        sum_exp = rescale * sum_exp + part_rescale * part_sum
        running_max = new_max
        if WITH_MEAN:
            logit_sum += tl.load(part + 3 * plane, mask=row_in, other=0.0)
        target_logit += tl.load(part + 4 * plane, mask=row_in, other=0.0)
    log_sum_exp = tl.log(sum_exp)
    lse = running_max + log_sum_exp
    tl.store(lse_ptr + rows, lse, mask=row_in)
    tl.store(logp_ptr + rows, target_logit - lse, mask=row_in)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, log_sum_exp - shifted_sum / sum_exp, mask=row_in)
    if WITH_MEAN:
        tl.store(mean_logp_ptr + rows, logit_sum / V - lse, mask=row_in)


@triton.jit
def _dlogits_kernel(hidden_ptr, weight_ptr, targets_ptr, order_ptr, num_valid_ptr, lse_ptr, entropy_ptr,
                    grad_logp_ptr, grad_entropy_ptr, grad_mean_ptr, dlogits_ptr, logits_ptr,
                    token_start, vocab_start, V, D, inv_temperature, chunk_stride, logits_stride,
                    WITH_ENTROPY_GRAD: tl.constexpr, WITH_MEAN_GRAD: tl.constexpr, FROM_LOGITS: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One (BLOCK_T, BLOCK_V) tile of dz for the chunk at (token_start, vocab_start), stored once.

    dz carries 1/tau (so dh = dz W and dW = dz^T h); rows past num_valid and columns past V store 0.
    The logits are recomputed, or with ``FROM_LOGITS`` read from the chunk buffer the forward kept.
    """
    num_valid = tl.load(num_valid_ptr)
    local_rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    if token_start + tl.program_id(0) * BLOCK_T >= num_valid:
        return
    rows, row_in = _valid_rows(order_ptr, num_valid, token_start + tl.program_id(0).to(tl.int64) * BLOCK_T, BLOCK_T)
    local_cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = vocab_start + local_cols
    col_in = cols < V
    if FROM_LOGITS:
        z = tl.load(logits_ptr + local_rows[:, None] * logits_stride + cols[None, :],
                    mask=row_in[:, None] & col_in[None, :], other=0.0)
    else:
        z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_in, col_in, D, inv_temperature,
                         BLOCK_T, BLOCK_V, BLOCK_D, PRECISION)
    target = tl.load(targets_ptr + rows, mask=row_in, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    g_logp = tl.load(grad_logp_ptr + rows, mask=row_in, other=0.0) * inv_temperature
    log_p = z - lse[:, None]
    p = tl.where(col_in[None, :], tl.exp(log_p), 0.0)
    dz = tl.where(cols[None, :] == target[:, None], g_logp[:, None], 0.0) - g_logp[:, None] * p
    if WITH_ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + rows, mask=row_in, other=0.0)
        g_entropy = tl.load(grad_entropy_ptr + rows, mask=row_in, other=0.0) * inv_temperature
        dz -= g_entropy[:, None] * p * (log_p + entropy[:, None])
    if WITH_MEAN_GRAD:
        g_mean = tl.load(grad_mean_ptr + rows, mask=row_in, other=0.0) * inv_temperature
        dz += g_mean[:, None] * (tl.where(col_in[None, :], 1.0 / V, 0.0) - p)
    dz = tl.where(row_in[:, None] & col_in[None, :], dz, 0.0)
    out = dlogits_ptr + local_rows[:, None] * chunk_stride + local_cols[None, :]
    tl.store(out, dz.to(dlogits_ptr.dtype.element_ty))


@triton.jit
def _grad_hidden_kernel(dlogits_ptr, weight_ptr, order_ptr, num_valid_ptr, sum_ptr, out_ptr,
                        token_start, vocab_start, num_cols, D, chunk_stride, chunk_rows,
                        ACCUMULATE: tl.constexpr, FINAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DESCRIBED: tl.constexpr):
    """dh[rows of the chunk, BLOCK_N dims] (+)= dz[chunk] @ W[chunk cols]. ``sum_ptr``: the chunk's fp32 partial
    sums (row i of the chunk at row i), read with ``ACCUMULATE``; the sum goes back there, or with ``FINAL`` (the
    last vocabulary chunk) into d(hidden) itself (``out_ptr``, in its dtype) at the rows' own indices.
    ``DESCRIBED``: both operands are read through tensor descriptors (TMA on sm_90), which read columns past the
    chunk as zeros; else by masked loads."""
    num_valid = tl.load(num_valid_ptr)
    if token_start + tl.program_id(0) * BLOCK_M >= num_valid:
        return
    local_rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = token_start + local_rows < num_valid
    dims = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_in = dims < D
    weight_ptr += vocab_start.to(tl.int64) * D  # the chunk's first weight row
    if DESCRIBED:
        dz_src = tl.make_tensor_descriptor(dlogits_ptr, shape=[chunk_rows, num_cols], strides=[chunk_stride, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_src = tl.make_tensor_descriptor(weight_ptr, shape=[num_cols, D], strides=[D, 1],
                                          block_shape=[BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, num_cols, BLOCK_K):
        if DESCRIBED:
            dz = dz_src.load([tl.program_id(0) * BLOCK_M, k0])
            w = w_src.load([k0, tl.program_id(1) * BLOCK_N])
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            k_in = ks < num_cols
            dz = tl.load(dlogits_ptr + local_rows[:, None] * chunk_stride + ks[None, :], mask=k_in[None, :],
                         other=0.0)
            w = tl.load(weight_ptr + ks[:, None] * D + dims[None, :], mask=k_in[:, None] & dim_in[None, :], other=0.0)
        acc = tl.dot(dz, w, acc, input_precision=PRECISION)
    out_mask = row_in[:, None] & dim_in[None, :]
    partial = sum_ptr + local_rows[:, None] * D + dims[None, :]
    if ACCUMULATE:
        acc += tl.load(partial, mask=out_mask, other=0.0)
    if FINAL:
        rows = tl.load(order_ptr + token_start + local_rows, mask=row_in, other=0)
        tl.store(out_ptr + rows[:, None] * D + dims[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(partial, acc, mask=out_mask)


@triton.jit
def _grad_weight_kernel(dlogits_ptr, hidden_ptr, order_ptr, num_valid_ptr, sum_ptr, out_ptr,
                        token_start, num_cols, D, chunk_stride, chunk_rows,
                        ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DESCRIBED: tl.constexpr):
    """dW[chunk cols, BLOCK_N dims] (+)= dz[chunk]^T @ h[valid rows of the chunk]. ``sum_ptr`` (fp32 partial sums,
    read with ``ACCUMULATE``) and ``out_ptr`` (the partial sums, or d(weight) in its dtype at the last token
    chunk) both start at the chunk's first column. ``DESCRIBED``: dz is read through a tensor descriptor of the
    chunk's valid rows (TMA on sm_90; rows past them read as zeros); the hidden rows are gathered either way."""
    num_rows = tl.minimum(tl.load(num_valid_ptr) - token_start, chunk_rows).to(tl.int32)  # int32: descriptor offsets
    if num_rows <= 0:
        return
    local_cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_in = local_cols < num_cols
    dims = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_in = dims < D
    if DESCRIBED:
        dz_src = tl.make_tensor_descriptor(dlogits_ptr, shape=[num_rows, num_cols], strides=[chunk_stride, 1],
                                           block_shape=[BLOCK_K, BLOCK_M])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, num_rows, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < num_rows
        rows = tl.load(order_ptr + token_start + ks, mask=k_in, other=0)
        if DESCRIBED:
            dz = dz_src.load([k0, tl.program_id(0) * BLOCK_M])
        else:
            dz = tl.load(dlogits_ptr + ks[:, None] * chunk_stride + local_cols[None, :],
                         mask=k_in[:, None] & col_in[None, :], other=0.0)
        h = tl.load(hidden_ptr + rows[:, None] * D + dims[None, :], mask=k_in[:, None] & dim_in[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz), h, acc, input_precision=PRECISION)
    offsets = local_cols[:, None] * D + dims[None, :]
    out_mask = col_in[:, None] & dim_in[None, :]
    if ACCUMULATE:
        acc += tl.load(sum_ptr + offsets, mask=out_mask, other=0.0)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def block_config(dim: int, dtype: torch.dtype, table: int) -> dict:
    """Tile sizes and launch options for hidden size ``dim``, input dtype and the GPU's tile table
    (:func:`~qwenlong.kernels.backend.tile_table`; never a function of T).

    ``BLOCK_T / BLOCK_V / BLOCK_D`` tile the logits kernels, ``BLOCK_M / BLOCK_N / BLOCK_K`` the two
    gradient GEMMs. Chosen from the sm_90 compile report (HGMMA 64x128 with 8 warps, no spills with d a
    multiple of 16): 128 token rows per logits tile halve the weight re-reads of 64. The forward that
    also stores its logits takes 128 rows on sm_90, where it stores them through a tensor descriptor
    (TMA); elsewhere descriptors lower to per-element stores, which spill at 128 rows (279-389 STL on
    sm_80) and even at 64 (40-44), so it keeps pointer stores and 64 rows. fp32 inputs take FMA, not
    tensor cores, and smaller tiles.
    """
    wide = dtype == torch.float32
    logits_by_descriptor = table == 90 and not wide
    return {
        "BLOCK_T": 64 if wide else 128,
        "BLOCK_T_KEEP_LOGITS": 128 if logits_by_descriptor else 64,
        "LOGITS_BY_DESCRIPTOR": logits_by_descriptor,
        "BLOCK_V": 64 if wide else 128,
        "BLOCK_D": 16 if wide else min(32, max(16, triton.next_power_of_2(dim))),
        "BLOCK_M": 64 if wide else 128,
        "BLOCK_N": min(64 if wide else 128, max(16, triton.next_power_of_2(dim))),
        "BLOCK_K": 16 if wide else 64,
        "PRECISION": "ieee" if wide else "tf32",  # fp32 inputs: no silent tf32 rounding
        "num_warps": 8,
        "forward_stages": 2 if wide else 3,
        "backward_stages": 2,
        "gemm_stages": 2 if wide else 3,
    }


def launch_options(config: dict, kernel: str) -> tuple[dict, dict]:
    """(constexprs, launch options) of ``kernel`` under ``config``: 'forward', 'forward_keep_logits'
    (the forward with ``STORE_LOGITS``), 'dlogits' or 'gemm'."""
    if kernel == "gemm":
        constexprs = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "PRECISION")}
        stages = config["gemm_stages"]
    else:
        constexprs = {k: config[k] for k in ("BLOCK_T", "BLOCK_V", "BLOCK_D", "PRECISION")}
        if kernel == "forward_keep_logits":
            constexprs |= {"BLOCK_T": config["BLOCK_T_KEEP_LOGITS"], "LOGITS_BY_DESCRIPTOR": config["LOGITS_BY_DESCRIPTOR"]}
        elif kernel == "forward":
            constexprs["LOGITS_BY_DESCRIPTOR"] = False
        stages = config["backward_stages" if kernel == "dlogits" else "forward_stages"]
    return constexprs, {"num_warps": config["num_warps"], "num_stages": stages}


def compact_rows(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, num_valid)``: row indices with the valid rows first (in order), and their count as a
    1-element device tensor. Runs on the device; nothing is copied to the host."""
    ignored = (targets == ignore_index).to(torch.uint8)
    order = torch.sort(ignored, stable=True).indices
    num_valid = (ignored.numel() - ignored.sum(dtype=torch.int64)).reshape(1)
    return order, num_valid


class _ChunkGradients:
    """d(hidden) and d(weight), made one (token chunk, vocabulary chunk) step at a time over the compacted valid rows.

    Per step, ``_dlogits_kernel`` writes dz once into a fixed (chunk_rows, VOCAB_CHUNK) buffer in the input dtype
    and the two GEMM kernels fold it in. Each gradient is summed in fp32 over the chunks of the other dimension
    and written in ``dtype`` once, at its last step: d(hidden) rows at the last vocabulary chunk, d(weight) rows at
    the last token chunk. The fp32 partial sums are passed in by the loop that runs the steps (its order decides
    which of them spans the whole dimension); a gradient made in a single step needs none.
    """

    def __init__(self, hidden, weight, order, num_valid, chunk_rows, needs_hidden=True, needs_weight=True,
                 dtype=None):
        self.hidden, self.weight, self.order, self.num_valid = hidden, weight, order, num_valid
        dtype = hidden.dtype if dtype is None else dtype
        self.config = _config_for(hidden)
        self.chunk_rows = chunk_rows
        self.chunk_cols = min(VOCAB_CHUNK, triton.cdiv(weight.shape[0], self.config["BLOCK_V"]) * self.config["BLOCK_V"])
        self.dlogits = torch.zeros((chunk_rows, self.chunk_cols), dtype=hidden.dtype, device=hidden.device)
        self.tile_options = launch_options(self.config, "dlogits")
        self.gemm_options = launch_options(self.config, "gemm")
        self.described = gemm_reads_by_descriptor(weight, self.config)
        if self.described:
            ensure_scratch_allocator(hidden.device)
        # zeros: ignored rows are never written
        self.grad_hidden = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device) if needs_hidden else None
        self.grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needs_weight else None

    @property
    def vocab_starts(self) -> range:
        return range(0, self.weight.shape[0], self.chunk_cols)

    def partial_sums(self, rows: int) -> torch.Tensor:
        """An fp32 (rows, d) buffer for the partial sums of a gradient made in several steps."""
        return torch.empty((rows, self.hidden.shape[1]), dtype=torch.float32, device=self.hidden.device)

    def add(self, token_start, vocab_start, hidden_sums, weight_sums, last_token_chunk, targets, lse, entropy, grads,
            flags, inv_temperature, logits=None):
        """Fold in the rows at positions [token_start, token_start + chunk_rows) of the compacted order and the
        vocabulary chunk at ``vocab_start``. ``hidden_sums`` / ``weight_sums``: fp32 partial sums of this token chunk's
        rows / this vocabulary chunk's rows (each starting at the chunk's first row), or None when their gradient
        is made in one step. ``grads``: fp32 (T,) output gradients (logp, entropy, mean_logp); ``logits``: the
        chunk's fp32 logits kept by the forward (else they are recomputed)."""
        dim, vocab = self.hidden.shape[1], self.weight.shape[0]
        (tile, tile_launch), (gemm, gemm_launch) = self.tile_options, self.gemm_options
        index = (self.order, self.num_valid)
        stored = (logits, logits.stride(0)) if logits is not None else (lse, 0)  # lse: an unused placeholder
        num_cols = min(self.chunk_cols, vocab - vocab_start)
        _dlogits_kernel[(self.chunk_rows // tile["BLOCK_T"], triton.cdiv(num_cols, tile["BLOCK_V"]))](
            self.hidden, self.weight, targets, *index, lse, entropy, *grads, self.dlogits, stored[0],
            token_start, vocab_start, vocab, dim, inv_temperature, self.chunk_cols, stored[1],
            **flags, FROM_LOGITS=logits is not None, **tile, **tile_launch,
        )
        if self.grad_hidden is not None:
            last_vocab_chunk = vocab_start + self.chunk_cols >= vocab
            sums = self.grad_hidden if hidden_sums is None else hidden_sums  # not read without partial sums
            _grad_hidden_kernel[(self.chunk_rows // gemm["BLOCK_M"], triton.cdiv(dim, gemm["BLOCK_N"]))](
                self.dlogits, self.weight, *index, sums, self.grad_hidden, token_start, vocab_start, num_cols, dim,
                self.chunk_cols, self.chunk_rows, ACCUMULATE=vocab_start > 0, FINAL=last_vocab_chunk,
                DESCRIBED=self.described, **gemm, **gemm_launch,
            )
        if self.grad_weight is not None:
            final = self.grad_weight[vocab_start:]
            sums = final if weight_sums is None else weight_sums
            _grad_weight_kernel[(triton.cdiv(num_cols, gemm["BLOCK_M"]), triton.cdiv(dim, gemm["BLOCK_N"]))](
                self.dlogits, self.hidden, *index, sums, final if last_token_chunk else sums, token_start, num_cols,
                dim, self.chunk_cols, self.chunk_rows, ACCUMULATE=token_start > 0, DESCRIBED=self.described, **gemm,
                **gemm_launch,
            )


def gemm_reads_by_descriptor(weight: torch.Tensor, config: dict) -> bool:
    """Whether the gradient GEMMs read dz and ``weight`` through tensor descriptors: tensor-core dtypes only (fp32
    inputs take FMA dots, where descriptors buy nothing), and a descriptor needs a 16-byte aligned base and rows of
    whole 16-byte units (a weight view can start anywhere: then masked loads)."""
    row_bytes = weight.shape[1] * weight.element_size()
    return config["PRECISION"] != "ieee" and row_bytes % 16 == 0 and weight.data_ptr() % 16 == 0


def _config_for(hidden: torch.Tensor) -> dict:
    """:func:`block_config` for ``hidden``'s width and dtype on its device's GPU generation."""
    return block_config(hidden.shape[1], hidden.dtype, tile_table(hidden.device))


def _chunk_rows(num_tokens: int, limit: int, config: dict) -> int:
    """Rows of a token chunk: ``limit``, or the whole batch rounded up to a GEMM tile when it is smaller (one
    tile for an empty batch: a chunk is never empty, so ``range(0, T, chunk_rows)`` always has a step)."""
    block = config["BLOCK_M"]
    return min(limit, max(1, triton.cdiv(num_tokens, block)) * block)


def vocab_slices(vocab: int, block_v: int) -> tuple[int, int]:
    """``(slices, columns per slice)`` of the forward: at most VOCAB_SPLITS slices of whole BLOCK_V tiles,
    none empty (a function of V only)."""
    tiles = triton.cdiv(vocab, block_v)
    split_cols = triton.cdiv(tiles, min(VOCAB_SPLITS, tiles)) * block_v
    return triton.cdiv(vocab, split_cols), split_cols


def _forward(hidden, weight, targets, order, num_valid, outputs, temperature, with_entropy, with_mean_logp,
             token_start=0, num_rows=None, logits=None):
    """Launch the forward kernel over ``num_rows`` positions of the compacted order from ``token_start``
    (default: all) and the slice merge, writing ``outputs = (logp, entropy, mean_logp, lse)`` and, if given,
    the chunk's logits."""
    (num_tokens, dim), vocab = hidden.shape, weight.shape[0]
    if num_tokens == 0:  # no rows: nothing to launch (the outputs are empty)
        return
    kind = "forward" if logits is None else "forward_keep_logits"
    constexprs, launch = launch_options(_config_for(hidden), kind)
    tiles = triton.cdiv(num_tokens if num_rows is None else num_rows, constexprs["BLOCK_T"])
    num_splits, split_cols = vocab_slices(vocab, constexprs["BLOCK_V"])
    positions = tiles * constexprs["BLOCK_T"]
    # indexed by row (a chunk's rows lie anywhere in [0, T)); rows never visited are never read
    partial = torch.empty((PARTIAL_STATS, num_splits, num_tokens), dtype=torch.float32, device=hidden.device)
    # partial: an unused placeholder
    stored = (logits, logits.shape[0], logits.stride(0)) if logits is not None else (partial, 0, 0)
    flags = {"WITH_ENTROPY": with_entropy, "WITH_MEAN": with_mean_logp}
    if constexprs.get("LOGITS_BY_DESCRIPTOR"):  # the kept logits are stored through a descriptor made on the device
        ensure_scratch_allocator(hidden.device)
    _forward_kernel[(tiles * num_splits,)](
        hidden, weight, targets, order, num_valid, partial, stored[0], token_start, num_tokens, *stored[1:],
        vocab, dim, split_cols, num_splits, 1.0 / temperature,
        **flags, STORE_LOGITS=logits is not None, **constexprs, **launch,
    )
    _combine_kernel[(triton.cdiv(positions, COMBINE_BLOCK),)](
        order, num_valid, partial, *outputs, token_start, num_tokens, num_splits, vocab, **flags, BLOCK=COMBINE_BLOCK,
    )


def _zeros(num_tokens, device, count=4):
    """fp32 per-token buffers; zeros, because ignored rows are never visited and must read 0."""
    return [torch.zeros((num_tokens,), dtype=torch.float32, device=device) for _ in range(count)]


class HostCount:
    """A device count (``compact_rows``' number of valid rows) copied to the host without waiting for it.

    The copy is queued behind the kernel that makes the count; :meth:`value` reads it later (in backward).
    If the host is still ahead of the GPU then, it waits only until the GPU has made the count, which comes
    before the LM head's forward GEMMs in the queue: the GPU still has those to run and never runs dry, as it
    would after ``.item()`` (which drains the whole queue at once)."""

    def __init__(self, count: torch.Tensor):
        self._ready, self._value = None, None
        if count.is_cuda:
            self._host = torch.empty(count.shape, dtype=count.dtype, pin_memory=True)
            self._host.copy_(count, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(count.device))  # the copy's stream, on the count's GPU
        else:
            self._host = count

    def value(self) -> int:
        if self._value is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._value = int(self._host)
        return self._value


class _TritonLinearStats(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels: ``(logp, entropy | None, mean_logp | None)``.

    The backward visits only the token chunks that hold valid rows (their count read through
    :class:`HostCount`): an RL batch whose prompt is 97% of its rows launches the kernels of its
    responses' chunks, not of every chunk of T."""

    @staticmethod
    @on_tensor_device
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp):
        order, num_valid = compact_rows(targets, ignore_index)
        ctx.valid_rows = HostCount(num_valid)
        logp, entropy, mean_logp, lse = outputs = _zeros(hidden.shape[0], hidden.device)
        _forward(hidden, weight, targets, order, num_valid, outputs, temperature, with_entropy, with_mean_logp)
        ctx.save_for_backward(hidden, weight, targets, order, num_valid, lse, entropy)
        ctx.temperature = temperature
        return logp, entropy if with_entropy else None, mean_logp if with_mean_logp else None

    @staticmethod
    @once_differentiable(LM_HEAD_OPS)
    @on_tensor_device
    def backward(ctx, grad_logp, grad_entropy, grad_mean_logp):
        hidden, weight, targets, order, num_valid, lse, entropy = ctx.saved_tensors
        chunk_rows = _chunk_rows(hidden.shape[0], TOKEN_CHUNK, _config_for(hidden))
        gradients = _ChunkGradients(hidden, weight, order, num_valid, chunk_rows, *ctx.needs_input_grad[:2])
        zeros = torch.zeros_like(lse)
        grads = [zeros if g is None else g.float().contiguous() for g in (grad_logp, grad_entropy, grad_mean_logp)]
        flags = {"WITH_ENTROPY_GRAD": grad_entropy is not None, "WITH_MEAN_GRAD": grad_mean_logp is not None}
        # vocabulary chunks outside, token chunks (only those with valid rows, which come first in `order`) inside:
        # d(weight) needs fp32 sums of one vocabulary chunk only, d(hidden) of the valid rows
        valid_rows = ctx.valid_rows.value()
        hidden_sums = gradients.partial_sums(valid_rows) if len(gradients.vocab_starts) > 1 else None
        weight_sums = gradients.partial_sums(gradients.chunk_cols) if valid_rows > chunk_rows else None
        for vocab_start in gradients.vocab_starts:
            for token_start in range(0, valid_rows, chunk_rows):
                gradients.add(token_start, vocab_start, None if hidden_sums is None else hidden_sums[token_start:],
                              weight_sums, token_start + chunk_rows >= valid_rows, targets, lse, entropy, grads, flags,
                              1.0 / ctx.temperature)
        return gradients.grad_hidden, gradients.grad_weight, None, None, None, None, None


class _TritonFusedLoss(torch.autograd.Function):
    """``(loss, logp, entropy, mean_logp)``: a scalar loss with its gradients made in the forward.

    Per LOGITS_TOKEN_CHUNK valid rows (only the chunks that hold some): the forward kernel computes the
    statistics and keeps the chunk's fp32 logits; ``token_loss`` and autograd give the per-token output
    gradients; dz comes from the kept logits (no recompute) and the GEMM kernels fold it into d(hidden),
    d(weight). Backward only scales them.

    fp16 inputs keep these gradients in fp32 until backward has scaled them: a GradScaler's scale (65536 is
    inf in fp16) multiplies them in fp32 and the product is rounded to fp16 once, so gradients of 2**-20, which
    the scale brings into fp16's range, are not first rounded to fp16 subnormals (or 0). bf16 (fp32's range)
    keeps them in bf16. (dz itself is stored in the input dtype, as on the recomputing path.)
    """

    @staticmethod
    @on_tensor_device
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp, token_loss):
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        order, num_valid = compact_rows(targets, ignore_index)
        outputs = _zeros(num_tokens, hidden.device)
        grads = _zeros(num_tokens, hidden.device, 3)
        chunk_rows = _chunk_rows(num_tokens, LOGITS_TOKEN_CHUNK, _config_for(hidden))
        # rows padded to whole 16 bytes, as a tensor descriptor needs (the kernels use the first V columns)
        logits = torch.empty((chunk_rows, triton.cdiv(vocab, 4) * 4), dtype=torch.float32, device=hidden.device)
        # fp16 keeps its gradients in fp32 until backward has scaled them (see the class docstring)
        gradients = _ChunkGradients(hidden, weight, order, num_valid, chunk_rows, *ctx.needs_input_grad[:2],
                                    dtype=torch.float32 if hidden.dtype == torch.float16 else None)
        # token chunks outside (each keeps its logits), vocabulary chunks inside: d(hidden) sums one token chunk's
        # rows, d(weight) all of its rows when several token chunks hold valid rows
        hidden_sums = gradients.partial_sums(chunk_rows) if len(gradients.vocab_starts) > 1 else None
        weight_sums = None  # made at the first token chunk when later ones hold valid rows too
        flags = {"WITH_ENTROPY_GRAD": with_entropy, "WITH_MEAN_GRAD": with_mean_logp}
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid_rows = HostCount(num_valid)
        for token_start in range(0, num_tokens, chunk_rows):
            # chunks past the valid rows (first in `order`) hold none: stop there. The count is read once the
            # first chunk's work is queued, which the GPU runs while the host waits (if at all) for the count
            if token_start > 0 and token_start >= valid_rows.value():
                break
            _forward(hidden, weight, targets, order, num_valid, outputs, temperature, with_entropy, with_mean_logp,
                     token_start, chunk_rows, logits)
            rows = order[token_start : token_start + chunk_rows]
            in_batch = torch.arange(token_start, token_start + rows.shape[0], device=rows.device) < num_valid
            wanted = (True, with_entropy, with_mean_logp)
            stats = [out[rows] if use else None for out, use in zip(outputs, wanted, strict=False)]
            chunk_loss, chunk_grads = token_loss_gradients(token_loss, rows, stats, in_batch)
            for buffer, grad in zip(grads, chunk_grads, strict=True):
                if grad is not None:
                    buffer.index_copy_(0, rows, grad)
            loss += chunk_loss
            last_token_chunk = token_start + chunk_rows >= valid_rows.value()
            if weight_sums is None and not last_token_chunk:
                weight_sums = gradients.partial_sums(weight.shape[0])
            for vocab_start in gradients.vocab_starts:
                gradients.add(token_start, vocab_start, hidden_sums,
                              None if weight_sums is None else weight_sums[vocab_start:], last_token_chunk, targets,
                              outputs[3], outputs[1], grads, flags, 1.0 / temperature, logits)
        results = gradients.grad_hidden, gradients.grad_weight
        ctx.save_for_backward(*(g for g in results if g is not None))
        ctx.has_grads = [g is not None for g in results]
        ctx.input_dtype = hidden.dtype
        logp, entropy, mean_logp, _ = outputs
        ctx.mark_non_differentiable(logp, entropy, mean_logp)
        return loss, logp, entropy if with_entropy else None, mean_logp if with_mean_logp else None

    @staticmethod
    @once_differentiable(LM_HEAD_OPS)
    @on_tensor_device
    def backward(ctx, grad_loss, *_):
        return (*scaled_gradients(ctx, grad_loss), None, None, None, None, None, None)


def _checked_temperature(temperature) -> float:
    """``temperature`` as a float: finite, > 0, and with a reciprocal that fits in fp32 (the kernels scale the
    logits by ``1 / temperature`` in fp32: inf gives uniform log-probs, 1e-40 an infinite scale and NaN)."""
    try:
        value = math.nan if isinstance(temperature, (str, bytes)) else float(temperature)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
        value = math.nan
    if not (math.isfinite(value) and value > 0 and 1.0 / value <= FP32_MAX):
        raise ValueError(f"temperature must be a finite number > 0 whose reciprocal fits in fp32 "
                         f"(>= {1.0 / FP32_MAX:.4g}), got {temperature!r}")
    return value


def _checked_ignore_index(ignore_index) -> int:
    """``ignore_index`` as an int; a float (1.5) or a bool is refused, not truncated."""
    try:
        value = None if isinstance(ignore_index, bool) else operator.index(ignore_index)
    except TypeError:
        value = None
    if value is None:
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    return value


def check_logprob_inputs(hidden, weight, targets, temperature, ignore_index):
    """Validate the shared inputs of the fused LM-head ops (ValueError naming the argument); returns
    ``(temperature, ignore_index)`` as a float and an int.

    The target range check reads tensor data: it runs on CPU tensors and, on a GPU, only when
    ``QWENLONG_CHECK_TENSORS=1`` (see :func:`tensor_checks_enabled`), so the hot path never waits
    for the device.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("targets", targets, ndim=1, dtypes=(torch.int32, torch.int64))
    check_same_device(hidden=hidden, weight=weight, targets=targets)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight.shape[1] must equal hidden.shape[1] ({hidden.shape[1]}), got {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must have one entry per token ({hidden.shape[0]}), got {tuple(targets.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape (0, d)")
    temperature, ignore_index = _checked_temperature(temperature), _checked_ignore_index(ignore_index)
    if tensor_checks_enabled(targets):
        in_use = targets != ignore_index
        bad = in_use & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}, "
                             f"got {targets[bad][:4].tolist()}")
    return temperature, ignore_index


def logprob_backend(device: torch.device) -> str:
    """The path of the fused LM-head ops on ``device`` (:func:`select_backend`; these ops have a CUDA-extension
    path). ``QWENLONG_BACKEND=cuda`` without the extension says that it is not built and why it did not load;
    an extension built without the log-prob ops says so.

    ``auto`` on a GPU takes the extension where it was built, else the Triton kernels: on an H200 the extension
    ran log-probs + entropy forward + backward 2.4x faster (339 vs 812 ms at T = 32K, d = 5120, V = 152K;
    41 vs 90 ms on an RL batch of 4K valid rows; benchmarks/results/nvidia-h200-2026-12-04-logprobs.md)."""
    backend = select_backend(device, has_cuda_op=True)
    if backend == "triton" and device.type == "cuda" and requested_backend() == "auto" and cuda_backend.available():
        return "cuda"
    if backend == "cuda" and not cuda_backend.available():
        raise RuntimeError("backend 'cuda' requested but the CUDA extension qwenlong._C._cuda was built without the "
                           "log-prob ops (no linear_logprobs_forward): rebuild it")
    return backend


def fused_linear_stats(hidden, weight, targets, temperature=1.0, ignore_index=-100,
                       with_entropy=False, with_mean_logp=False):
    """``(logp, entropy | None, mean_logp | None)`` per token, fp32, from either backend.

    All outputs are 0 (and pass no gradient) at rows whose target is ``ignore_index``.
    """
    temperature, ignore_index = check_logprob_inputs(hidden, weight, targets, temperature, ignore_index)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.to(torch.int64).contiguous()
    args = (hidden, weight, targets, temperature, ignore_index, bool(with_entropy), bool(with_mean_logp))
    # QWENLONG_BACKEND=cuda picks the CUDA-extension epilogue (cuBLAS tiles) where it was built
    backend = logprob_backend(hidden.device)
    if backend == "triton":
        return _TritonLinearStats.apply(*args)
    return ValidRowStats.apply(*args, HOST_BACKENDS[backend])


def linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False, ignore_index=-100):
    """fp32 ``log softmax(hidden @ weight.T / temperature)[target]`` per token, without the logits.

    hidden ``(T, d)``, weight ``(V, d)`` of the same float dtype, targets ``(T,)`` int. Returns
    ``logp (T,)`` or, with ``return_entropy``, ``(logp, entropy)``; both are 0 at rows whose
    target is ``ignore_index`` and differentiable with respect to hidden and weight.
    """
    logp, entropy, _ = fused_linear_stats(hidden, weight, targets, temperature, ignore_index, return_entropy)
    return (logp, entropy) if return_entropy else logp


FP16_GRAD_IN_FORWARD = ("fp16 inputs with gradients made in the forward: the logit gradients are rounded to fp16 "
                        "before any loss scale reaches them and underflow for a large vocabulary (percents off the "
                        "gradients); use bf16, or grad_in_forward=False (its backward takes the scaled gradient)")


def fused_linear_loss(hidden, weight, targets, token_loss, temperature=1.0, ignore_index=-100, with_entropy=False,
                      with_mean_logp=False):
    """A scalar loss ``sum_t token_loss(...)_t`` over the valid rows, with its gradients made in the forward.

    ``token_loss(rows, logp, entropy, mean_logp)`` gets the int64 row indices (into T) of a chunk of
    valid rows and their fp32 statistics (``entropy`` / ``mean_logp`` None unless asked for) and
    returns their per-token losses; it must be differentiable in the statistics, per token, and give
    finite values and derivatives wherever its inputs are finite (it may also be called on ignored rows,
    whose result is discarded). Only ``hidden`` and ``weight`` get gradients: tensors ``token_loss`` captures
    are taken as constants. Returns ``(loss, logp, entropy | None, mean_logp | None)``, the
    statistics detached.

    The logits of each chunk of valid rows are kept in fp32 (Triton: ``LOGITS_TOKEN_CHUNK x V``; the CUDA
    extension: its 4096-row token chunk x V; the chunked PyTorch path: ``chunked.KEPT_ROWS x V``), so forward +
    backward issue 6 T_valid d V FLOPs instead of 8, and ``loss.backward()`` only scales the stored
    gradients. With several chunks of valid rows, d(weight) is summed over them in an fp32 V x d buffer.
    Where nothing can differentiate the loss (``torch.no_grad()``, or neither ``hidden`` nor ``weight``
    requires grad: an evaluation) no gradient is made and no logits are kept: the forward alone runs.

    fp16 loses precision here (a warning says so): the logit gradients are made before any loss scale, about
    p / T_valid each, and the Triton and CUDA GEMMs take them in fp16, which flushes most of a large vocabulary's
    to zero (a CPU emulation at T=122,880, V=152,064: 2-4% off d(hidden)). bf16 has fp32's range and does not.
    """
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):  # it checks the inputs
        stats = fused_linear_stats(hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        loss = torch.where(targets != ignore_index, token_loss(rows, *stats), 0.0).sum()
        return loss, *stats
    temperature, ignore_index = check_logprob_inputs(hidden, weight, targets, temperature, ignore_index)
    if hidden.dtype == torch.float16:
        warnings.warn(FP16_GRAD_IN_FORWARD, stacklevel=3)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.to(torch.int64).contiguous()
    args = (hidden, weight, targets, temperature, ignore_index, bool(with_entropy), bool(with_mean_logp), token_loss)
    backend = logprob_backend(hidden.device)
    if backend == "triton":
        return _TritonFusedLoss.apply(*args)
    return ValidRowLoss.apply(*args, HOST_BACKENDS[backend])
