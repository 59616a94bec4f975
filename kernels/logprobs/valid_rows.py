"""The autograd Function of the host-launched backends (:mod:`.chunked`, :mod:`.cuda_backend`).

Only rows whose target is not ``ignore_index`` are gathered and computed (forward and
backward), so a batch costs time in proportion to its valid rows and an ignored row's inputs
(even NaN) reach nothing; ignored rows get 0 outputs and exactly zero gradient. Finding the
valid rows reads the targets on the host: free for CPU tensors, one synchronisation per call
for the CUDA extension. The backend is a module with ``forward`` and ``backward`` functions,
chosen by :func:`qwenlong.kernels.backend.select_backend` in :mod:`.linear_logprobs`.
"""

from __future__ import annotations

import torch

from ..utils.autograd import once_differentiable


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
    @once_differentiable("the fused LM head (linear_logprobs, linear_cross_entropy, grpo_loss)")
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


def _gather(ctx, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The valid rows of ``values`` (``values`` itself when every row is valid)."""
    return values if ctx.all_valid else values.index_select(0, rows)


def _scatter(ctx, values: torch.Tensor, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``values`` of the valid rows put back at their rows, zeros elsewhere (``values`` itself when every row is
    valid)."""
    return values if ctx.all_valid else values.new_zeros((num_tokens, *values.shape[1:])).index_copy_(0, rows, values)
