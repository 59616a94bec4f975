"""Collectives for sequence parallelism, each differentiable, with the matching collective as its backward.

Every rank of a group calls these together and in the same order. Gradients follow one
convention: a tensor that is *sharded* across the group carries the gradient of its own
shard; a tensor that is *replicated* (the same on every rank, used the same way on every
rank) carries the one full gradient on every rank. Parameter gradients are then partial on
each rank and are summed over the group (and over data parallel), as a plain all-reduce does.

    all_to_all(x, scatter_dim=s, gather_dim=g)   sharded -> sharded    backward: all_to_all(g -> s)
    all_gather_tokens(x)                          sharded -> replicated backward: keep own slice
    all_reduce_sum(x)                             partial -> replicated backward: identity

A peer that died or a collective that waits longer than the group's timeout raises a
``RuntimeError`` naming the collective (set the timeout with ``new_sequence_parallel_groups``
or ``init_process_group(timeout=...)``), never a silent hang.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from ..utils.autograd import once_differentiable


def group_size(group) -> int:
    """Ranks in ``group``; without an initialized process group, a single process is a group of one."""
    if group is None and not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None and not dist.is_initialized():
        return 0
    return dist.get_rank(group)


@contextmanager
def _collective(name: str, group):
    """Re-raise a failed collective with what it was and the likely cause."""
    try:
        yield
    except RuntimeError as error:
        raise RuntimeError(
            f"sequence-parallel {name} over {group_size(group)} ranks failed: a peer rank died or the collective "
            f"waited longer than the process group's timeout ({error})"
        ) from error


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = group_size(group)
    if x.shape[scatter_dim] % world != 0:
        raise ValueError(f"all_to_all: x.shape[{scatter_dim}]={x.shape[scatter_dim]} is not divisible by the group size {world}")
    chunks = x.chunk(world, dim=scatter_dim)
    # one flat buffer, chunk j for rank j: all_to_all_single runs on every backend (gloo's list-form all_to_all
    # arrived in torch 2.12, and the package supports 2.8 on)
    send = torch.cat([chunk.reshape(-1) for chunk in chunks])
    receive = torch.empty_like(send)
    with _collective("all_to_all", group):
        dist.all_to_all_single(receive, send, group=group)
    return torch.cat(receive.view(world, *chunks[0].shape).unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    @once_differentiable("all_to_all")
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: torch.Tensor, group=None, *, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split ``x`` into P chunks along ``scatter_dim``, send chunk j to rank j, concatenate what arrives
    (in rank order) along ``gather_dim``. Ulysses uses it to trade the token shard for a head shard."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


class _AllGatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        world = group_size(group)
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        # torch 2.13 renamed all_gather_into_tensor (now its deprecated alias) all_gather_single; older ones lack it
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        with _collective("all_gather", group):
            gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # The gathered tensor is replicated, so every rank holds the full gradient: keep our slice.
        return grad.chunk(group_size(ctx.group), dim=0)[group_rank(ctx.group)], None


def all_gather_tokens(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order (all shards must have the same shape)."""
    if group_size(group) == 1:
        return x
    return _AllGatherTokens.apply(x, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        with _collective("all_reduce", group):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # Each rank back-propagates its own share; summing parameter gradients over ranks completes it.
        return grad, None


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``x`` over the group, the same on every rank (e.g. a loss made of per-rank shares)."""
    if group_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def new_sequence_parallel_groups(sp_size: int, timeout: timedelta | None = None):
    """Split the world into sequence-parallel groups of ``sp_size`` consecutive ranks and the
    data-parallel groups across them. Returns ``(sp_group, dp_group)`` for this rank.

    Every rank must call it (group creation is collective). ``timeout`` bounds how long a
    collective on these groups waits for a missing peer before raising.
    """
    world = dist.get_world_size()
    if sp_size < 1 or world % sp_size != 0:
        raise ValueError(f"sp_size must divide the world size {world}, got {sp_size}")
    rank = dist.get_rank()
    kwargs = {} if timeout is None else {"timeout": timeout}
    sp_group = dp_group = None
    for start in range(0, world, sp_size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + sp_size)), **kwargs)
        if start <= rank < start + sp_size:
            sp_group = group
    for offset in range(sp_size):
        group = dist.new_group(list(range(offset, world, sp_size)), **kwargs)
        if rank % sp_size == offset:
            dp_group = group
    return sp_group, dp_group
