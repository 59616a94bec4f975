"""The autograd Functions of the host-launched backends (:mod:`.chunked`, :mod:`.cuda_backend`).

Only rows whose target is not ``ignore_index`` are gathered and computed (forward and
backward), so a batch costs time in proportion to its valid rows and an ignored row's inputs
(even NaN) reach nothing; ignored rows get 0 outputs and exactly zero gradient. Finding the
valid rows reads the targets on the host: free for CPU tensors, one synchronisation per call
for the CUDA extension. The backend is a module with ``forward`` and ``backward`` functions (and, for
:class:`ValidRowLoss`, ``KEPT_ROWS`` and ``kept_logits``), chosen by
:func:`qwenlong.kernels.backend.select_backend` in :mod:`.linear_logprobs`.
"""

from __future__ import annotations

import torch

from ..utils.autograd import once_differentiable, token_loss_gradients

# named when a double backward is refused
LM_HEAD_OPS = "the fused LM head (linear_logprobs, linear_cross_entropy, grpo_loss)"


class ValidRowStats(torch.autograd.Function):
    """``(logp, entropy | None, mean_logp | None)`` per token; ``impl``'s backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp, impl):
        rows = (targets != ignore_index).nonzero()[:, 0]
        ctx.all_valid = rows.shape[0] == targets.shape[0]  # then nothing is gathered or scattered (no copies)
        outputs = impl.forward(_gather(ctx, hidden, rows), weight, _gather(ctx, targets, rows), temperature,
                               ignore_index, with_entropy, with_mean_logp)
        logp, entropy, mean_logp, lse = (
            None if out is None else _scatter(ctx, out, rows, hidden.shape[0]) for out in outputs
        )
        ctx.save_for_backward(hidden, weight, targets, rows, lse, entropy)
        ctx.temperature, ctx.impl = temperature, impl
        return logp, entropy, mean_logp

    @staticmethod
    @once_differentiable(LM_HEAD_OPS)
    def backward(ctx, grad_logp, grad_entropy, grad_mean_logp):
        hidden, weight, targets, rows, lse, entropy = ctx.saved_tensors

        def valid_rows(values):
            return None if values is None else _gather(ctx, values, rows).float()

        grad_logp = valid_rows(grad_logp) if grad_logp is not None else lse.new_zeros(rows.shape[0])
        hidden_rows, target_rows = _gather(ctx, hidden, rows), _gather(ctx, targets, rows)
        entropy_rows = valid_rows(entropy) if grad_entropy is not None else None
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_rows, grad_weight = ctx.impl.backward(hidden_rows, weight, target_rows, valid_rows(lse), entropy_rows,
                                                   grad_logp, valid_rows(grad_entropy), valid_rows(grad_mean_logp),
                                                   ctx.temperature, needs_hidden, needs_weight)
        grad_hidden = None if grad_rows is None else _scatter(ctx, grad_rows.to(hidden.dtype), rows, hidden.shape[0])
        return grad_hidden, grad_weight, None, None, None, None, None, None


class ValidRowLoss(torch.autograd.Function):
    """``(loss, logp, entropy | None, mean_logp | None)``: a scalar loss with its gradients made in the forward.

    The valid rows go through ``impl`` ``impl.KEPT_ROWS`` at a time: its forward keeps their fp32 logits,
    ``token_loss`` and autograd give the per-token output gradients, and its backward makes d(hidden) and d(weight)
    from the kept logits instead of recomputing them (6 instead of 8 T_valid d V FLOPs). With several chunks
    d(weight) is summed in fp32 over them; fp16 keeps both gradients in fp32 until backward has scaled them (a
    GradScaler's scale is applied before the one rounding to fp16). Backward only scales. The gradients are the
    recomputing path's (:class:`ValidRowStats`) bit for bit on :mod:`.chunked`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, with_mean_logp, token_loss,
                impl):
        rows = (targets != ignore_index).nonzero()[:, 0]
        num_tokens, num_valid, chunk = targets.shape[0], rows.shape[0], impl.KEPT_ROWS
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        grad_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
        grad_hidden = hidden.new_zeros(hidden.shape, dtype=grad_dtype) if needs_hidden else None
        weight_sum = None  # d(weight) in fp32 over several chunks (and for fp16)
        if needs_weight and (num_valid > chunk or (num_valid and weight.dtype == torch.float16)):
            weight_sum = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_weight = torch.zeros_like(weight) if needs_weight and num_valid == 0 else None
        outputs = [hidden.new_zeros((num_tokens,), dtype=torch.float32) for _ in range(3)]  # logp, entropy, mean
        wanted = (True, with_entropy, with_mean_logp)
        loss = hidden.new_zeros((), dtype=torch.float32)
        kept = impl.kept_logits(num_valid, weight.shape[0], hidden.device) if num_valid else None
        for start in range(0, num_valid, chunk):
            chunk_rows = rows[start : start + chunk]
            whole = chunk_rows.shape[0] == num_tokens  # every row valid, in one chunk: no copies
            hidden_rows = hidden if whole else hidden.index_select(0, chunk_rows)
            target_rows = targets if whole else targets.index_select(0, chunk_rows)
            logp, entropy, mean_logp, lse = impl.forward(hidden_rows, weight, target_rows, temperature, ignore_index,
                                                         with_entropy, with_mean_logp, kept_logits=kept)
            stats = [stat if use else None for stat, use in zip((logp, entropy, mean_logp), wanted, strict=True)]
            chunk_loss, (grad_logp, grad_entropy, grad_mean) = token_loss_gradients(token_loss, chunk_rows, stats)
            loss += chunk_loss
            grad_rows, grad_weight_rows = impl.backward(
                hidden_rows, weight, target_rows, lse, entropy, grad_logp, grad_entropy, grad_mean, temperature,
                needs_hidden, needs_weight, kept_logits=kept, grad_weight_sum=weight_sum)
            if needs_hidden:
                grad_hidden.index_copy_(0, chunk_rows, grad_rows.to(grad_dtype))
            if needs_weight:
                grad_weight = grad_weight_rows
            for out, stat in zip(outputs, stats, strict=True):
                if stat is not None:
                    out.index_copy_(0, chunk_rows, stat)
        ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight) if g is not None))
        ctx.has_grads = needs_hidden, needs_weight
        ctx.input_dtype = hidden.dtype
        logp, entropy, mean_logp = outputs
        ctx.mark_non_differentiable(logp, entropy, mean_logp)
        return loss, logp, entropy if with_entropy else None, mean_logp if with_mean_logp else None

    @staticmethod
    @once_differentiable(LM_HEAD_OPS)
    def backward(ctx, grad_loss, *_):
        return (*scaled_gradients(ctx, grad_loss), None, None, None, None, None, None, None)


SCALE_ROWS = 4096  # rows scaled at a time by scaled_gradients (an fp32 block of them, never a whole gradient)


def scaled_gradients(ctx, grad_loss):
    """``(grad_hidden, grad_weight)`` saved by a forward that made them, times ``grad_loss`` (None where not needed).

    The product is taken in fp32 and rounded to the input dtype once: the scale itself is never rounded (1/3 in
    bf16 is 0.2% off, a bias on every element), and fp16's fp32 gradients meet a loss scale before any rounding
    (bf16 gradients are stored rounded). ``SCALE_ROWS`` rows at a time, so no fp32 copy of a whole gradient is made.
    """
    saved = iter(ctx.saved_tensors)
    scale = grad_loss.float()
    grads = []
    for has in ctx.has_grads:
        if not has:
            grads.append(None)
            continue
        grad = next(saved)
        out = torch.empty(grad.shape, dtype=ctx.input_dtype, device=grad.device)
        for start in range(0, grad.shape[0], SCALE_ROWS):
            out[start : start + SCALE_ROWS] = grad[start : start + SCALE_ROWS].float() * scale
        grads.append(out)
    return grads


def _gather(ctx, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The valid rows of ``values`` (``values`` itself when every row is valid)."""
    return values if ctx.all_valid else values.index_select(0, rows)


def _scatter(ctx, values: torch.Tensor, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``values`` of the valid rows put back at their rows, zeros elsewhere (``values`` itself when every row is
    valid)."""
    return values if ctx.all_valid else values.new_zeros((num_tokens, *values.shape[1:])).index_copy_(0, rows, values)
