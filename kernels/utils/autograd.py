"""Autograd helpers of the kernels' Functions.

``once_differentiable(op)``: marks an autograd Function's backward as not differentiable again.

Like :func:`torch.autograd.function.once_differentiable`, which only looks at the incoming gradients: in
``torch.autograd.grad(loss, h, create_graph=True)`` those are constants, so its gradient silently carries no
second derivative (or a second backward fails with an unrelated message). Here, under ``create_graph=True``,
the returned gradients hang off a node that raises, naming the op, when a second backward reaches it; its
inputs are the incoming gradients and the saved tensors that require grad (the Function's inputs), so a second
backward through those reaches it. A Function that saved none of its inputs raises at once under
``create_graph=True``. A plain backward is untouched.

``on_tensor_device``: runs a Triton Function's forward or backward with its tensors' GPU current.

``token_loss_gradients``: a chunk's loss and its gradient with respect to per-token statistics, for the ops that
make their gradients in the forward.
"""

from __future__ import annotations

import functools

import torch


def on_tensor_device(method):
    """Decorator of an autograd Function's ``forward`` / ``backward`` that launches Triton kernels: they run with
    the GPU of the first tensor argument (else of the saved tensors) current. Triton launches on the current
    device and its stream, so a tensor on another GPU (one process driving a model spread over GPUs, as
    ``device_map`` does) would be read from the wrong device; torchrun ranks set theirs and are unaffected."""

    @functools.wraps(method)
    def wrapper(ctx, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)] or [
            t for t in getattr(ctx, "saved_tensors", ()) if t is not None]
        device = tensors[0].device if tensors else None
        if device is None or device.type != "cuda":
            return method(ctx, *args)
        with torch.cuda.device(device):
            return method(ctx, *args)

    wrapper.launches_on_tensor_device = True
    return wrapper


def once_differentiable(op: str):
    """Decorator of the ``backward`` of an autograd Function behind the op named ``op`` (named in the error)."""
    message = (f"{op} does not support double backward (differentiating a gradient taken with create_graph=True): "
               f"the gradients its backward returns are not differentiable again")

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # a plain backward (create_graph=False)
                return outputs
            inputs = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
            if not inputs and any(ctx.needs_input_grad):
                raise RuntimeError(message)
            links = inputs + [g for g in grads if isinstance(g, torch.Tensor) and g.requires_grad]
            if not links:
                return outputs
            single = not isinstance(outputs, tuple)
            outputs = (outputs,) if single else outputs
            # detached aliases that require grad, so that the node is recorded as their grad_fn
            aliases = [value if value is None else value.detach().requires_grad_() for value in outputs]
            error = torch._C._functions.DelayedError(message.encode(), len(aliases) + len(links))
            outputs = tuple(error(*aliases, *links)[: len(aliases)])
            return outputs[0] if single else outputs

        return wrapper

    return decorate


def token_loss_gradients(token_loss, rows, stats, keep=None):
    """``(loss, grads)`` of ``loss = sum token_loss(rows, *stats)`` over the rows ``keep`` selects (all without it).

    ``stats``: per-row tensors (None where not computed); ``grads`` holds d loss / d stat for each of them (None
    where the stat is None, zeros where the loss does not use it), 0 on rows not kept. ``loss`` is detached;
    tensors ``token_loss`` captures are constants here (no gradient reaches them).
    """
    with torch.enable_grad():
        inputs = [None if stat is None else stat.detach().requires_grad_() for stat in stats]
        per_row = token_loss(rows, *inputs)
        loss = (per_row if keep is None else torch.where(keep, per_row, 0.0)).sum()
        given = [x for x in inputs if x is not None]
        found = torch.autograd.grad(loss, given, allow_unused=True) if loss.requires_grad else [None] * len(given)
    by_input = dict(zip(map(id, given), found, strict=True))
    grads = []
    for x in inputs:
        grad = None if x is None else by_input[id(x)]
        if x is not None and grad is None:  # the loss does not use this statistic
            grad = torch.zeros_like(x)
        grads.append(grad if grad is None or keep is None else torch.where(keep, grad, 0.0))
    return loss.detach(), grads
