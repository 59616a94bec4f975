"""Memory-efficient PyTorch attention over packed sequences: the CPU path of ``varlen_attention``.

Same math and masking as :mod:`.varlen` (see its docstring), computed one sequence at a
time, in query blocks of ``BLOCK_Q`` rows that stream key blocks of ``BLOCK_K`` with an
online softmax in fp32. Memory is ``O(heads * BLOCK_Q * BLOCK_K)`` beyond the inputs and
outputs, never ``T x T``; the backward recomputes the probabilities from the saved
log-sum-exp. Blocks are fixed-size, sequence-local and copied into fresh tensors, so a
sequence's results are bitwise the same alone or packed beside others.
"""

from __future__ import annotations

import torch

from ..utils.autograd import once_differentiable

BLOCK_Q = 128
BLOCK_K = 256


def _fresh_fp32(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 copy: the same bits and memory layout wherever ``x`` was sliced from."""
    return x.to(torch.float32, copy=True).contiguous()


def _key_blocks(q0: int, q1: int, q_len: int, k_len: int, left: int, right: int):
    """Start offsets of the key blocks that query rows ``q0..q1-1`` may see (block aligned)."""
    start = max(q0 + k_len - q_len - left, 0)
    end = min(q1 - 1 + k_len - q_len + right + 1, k_len)
    return range(start // BLOCK_K * BLOCK_K, end, BLOCK_K)


def _allowed(q0, q1, k0, k1, q_len: int, k_len: int, left: int, right: int, device) -> torch.Tensor:
    """Boolean ``(q1 - q0, k1 - k0)``: True where a query row may attend a key."""
    position = torch.arange(q0, q1, device=device)[:, None] + (k_len - q_len)  # bottom-right alignment
    keys = torch.arange(k0, k1, device=device)[None, :]
    return (keys >= position - left) & (keys <= position + right)


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(rows, heads, d)`` -> ``(kv_heads, group, rows, d)``: query heads sharing a kv head together."""
    rows, heads, dim = x.shape
    return x.view(rows, kv_heads, heads // kv_heads, dim).permute(1, 2, 0, 3)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_grouped`: ``(kv_heads, group, rows, d)`` -> ``(rows, heads, d)``."""
    kv_heads, group, rows, dim = x.shape
    return x.permute(2, 0, 1, 3).reshape(rows, kv_heads * group, dim)


def _forward_sequence(q, k, v, scale, left, right):
    """One sequence: q ``(q_len, heads, d)``, k/v ``(k_len, kv_heads, d)`` -> out, lse ``(heads, q_len)``."""
    q_len, k_len, kv_heads = q.shape[0], k.shape[0], k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[1], q_len, dtype=torch.float32, device=q.device)
    for q0 in range(0, q_len, BLOCK_Q):
        q1 = min(q0 + BLOCK_Q, q_len)
        qb = _grouped(_fresh_fp32(q[q0:q1]), kv_heads)  # (kv_heads, group, rows, d)
        row_max = torch.full(qb.shape[:3], float("-inf"), device=q.device)
        row_sum = torch.zeros_like(row_max)
        acc = torch.zeros_like(qb)
        for k0 in _key_blocks(q0, q1, q_len, k_len, left, right):
            k1 = min(k0 + BLOCK_K, k_len)
            kb = _fresh_fp32(k[k0:k1]).permute(1, 2, 0)[:, None]  # (kv_heads, 1, d, cols)
            vb = _fresh_fp32(v[k0:k1]).permute(1, 0, 2)[:, None]  # (kv_heads, 1, cols, d)
            s = (qb @ kb) * scale
            s = s.masked_fill(~_allowed(q0, q1, k0, k1, q_len, k_len, left, right, q.device), float("-inf"))
            new_max = torch.maximum(row_max, s.amax(-1))
            shift = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows with nothing allowed yet
            p = torch.exp(s - shift[..., None])
            rescale = torch.exp(row_max - shift)
            row_sum = row_sum * rescale + p.sum(-1)
            acc = acc * rescale[..., None] + p @ vb
            row_max = new_max
        out[q0:q1] = _ungrouped(acc / row_sum.masked_fill(row_sum == 0, 1.0)[..., None])
        lse[:, q0:q1] = (row_max + torch.log(row_sum)).flatten(0, 1)  # -inf where no key was allowed
    return out, lse


def _backward_sequence(do, dlse, q, k, v, out, lse, scale, left, right):
    """Gradients of one sequence, recomputing the probabilities block by block from ``lse``."""
    q_len, k_len, kv_heads = q.shape[0], k.shape[0], k.shape[1]
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device).permute(1, 0, 2)  # (kv_heads, k_len, d)
    dv = torch.zeros_like(dk)
    for q0 in range(0, q_len, BLOCK_Q):
        q1 = min(q0 + BLOCK_Q, q_len)
        qb = _grouped(_fresh_fp32(q[q0:q1]), kv_heads)
        dob = _grouped(_fresh_fp32(do[q0:q1]), kv_heads)
        delta = (dob * _grouped(_fresh_fp32(out[q0:q1]), kv_heads)).sum(-1, keepdim=True)
        lse_b = lse[:, q0:q1].reshape(qb.shape[:3])[..., None]
        if dlse is not None:  # d lse_i / d s_ij = p_ij
            delta = delta - dlse[:, q0:q1].reshape(qb.shape[:3])[..., None]
        dqb = torch.zeros_like(qb)
        for k0 in _key_blocks(q0, q1, q_len, k_len, left, right):
            k1 = min(k0 + BLOCK_K, k_len)
            kb = _fresh_fp32(k[k0:k1]).permute(1, 0, 2)[:, None]  # (kv_heads, 1, cols, d)
            vb = _fresh_fp32(v[k0:k1]).permute(1, 0, 2)[:, None]
            s = (qb @ kb.transpose(-1, -2)) * scale
            allowed = _allowed(q0, q1, k0, k1, q_len, k_len, left, right, q.device)
            p = torch.where(allowed, torch.exp(s - lse_b), 0.0)  # where: rows with lse=-inf give 0, not NaN
            dv[:, k0:k1] += (p.transpose(-1, -2) @ dob).sum(1)
            ds = p * (dob @ vb.transpose(-1, -2) - delta)
            dqb += ds @ kb
            dk[:, k0:k1] += (ds.transpose(-1, -2) @ qb).sum(1)
        dq[q0:q1] = _ungrouped(dqb * scale)
    return dq, (dk * scale).permute(1, 0, 2), dv.permute(1, 0, 2)


class BlockwiseAttention(torch.autograd.Function):
    """``(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right) -> (out, lse)``.

    ``left``/``right`` are the window sides already resolved by the caller (causal: right=0;
    unbounded: a number larger than any sequence).
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
        for (qs, qe), (ks, ke) in _sequences(cu_seqlens_q, cu_seqlens_k):
            seq_out, seq_lse = _forward_sequence(q[qs:qe], k[ks:ke], v[ks:ke], scale, left, right)
            out[qs:qe] = seq_out
            lse[:, qs:qe] = seq_lse
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (scale, left, right)
        ctx.set_materialize_grads(False)  # an output no loss reads gets None
        return out, lse

    @staticmethod
    @once_differentiable("varlen_attention")
    def backward(ctx, do, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        scale, left, right = ctx.args
        if do is None:  # a loss of lse alone
            do = torch.zeros_like(out)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for (qs, qe), (ks, ke) in _sequences(cu_seqlens_q, cu_seqlens_k):
            grads = _backward_sequence(
                do[qs:qe], None if dlse is None else dlse[:, qs:qe], q[qs:qe], k[ks:ke], v[ks:ke], out[qs:qe],
                lse[:, qs:qe], scale, left, right
            )
            dq[qs:qe], dk[ks:ke], dv[ks:ke] = grads
        return dq, dk, dv, None, None, None, None, None


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """``((q_start, q_end), (k_start, k_end))`` for every sequence."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [((cu_q[b], cu_q[b + 1]), (cu_k[b], cu_k[b + 1])) for b in range(len(cu_q) - 1)]
