"""Split a packed batch into contiguous token shards, one per sequence-parallel rank, and gather back.

The packed token count T is padded to a multiple of the group size P; the padding forms a
sequence of its own (appended to ``cu_seqlens``), so under causal, per-sequence attention it
never attends real tokens nor is attended by them, and its labels are ``ignore_index`` so it
never enters a loss. Rank r holds tokens ``[r * T_pad / P, (r + 1) * T_pad / P)``.

Labels are shifted on the *full* packed batch before sharding (``next_token_labels``): the
label of a rank's last token is the first token of the next rank's shard.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..utils.checks import check_cu_seqlens, check_tensor
from .comm import all_gather_tokens, group_rank, group_size


def next_token_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels[t] = input_ids[t + 1]`` inside each sequence; the last token of a sequence gets ``ignore_index``."""
    check_tensor("input_ids", input_ids, ndim=1)
    check_cu_seqlens("cu_seqlens", cu_seqlens, input_ids.shape[0])
    labels = torch.full_like(input_ids, ignore_index)
    labels[:-1] = input_ids[1:]
    ends = cu_seqlens[1:].long() - 1
    labels[ends[ends >= 0]] = ignore_index
    return labels


def pad_cu_seqlens(cu_seqlens: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """Append a padding sequence so the total is a multiple of ``multiple``. Returns ``(cu_seqlens, num_pad)``."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    total = int(cu_seqlens[-1])
    num_pad = -total % multiple
    if num_pad == 0:
        return cu_seqlens, 0
    return torch.cat([cu_seqlens, cu_seqlens.new_tensor([total + num_pad])]), num_pad


@dataclass(frozen=True)
class ShardedBatch:
    """One rank's share of a packed batch.

    ``cu_seqlens``/``max_seqlen`` describe the *whole* padded batch (what ``ulysses_attention``
    needs); ``tensors`` holds this rank's contiguous slice of every per-token tensor.
    """

    tensors: dict[str, torch.Tensor]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    num_tokens: int  # real tokens, before padding
    num_pad: int
    rank: int
    world_size: int

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def local_tokens(self) -> int:
        return (self.num_tokens + self.num_pad) // self.world_size

    @property
    def local_slice(self) -> slice:
        return slice(self.rank * self.local_tokens, (self.rank + 1) * self.local_tokens)


def _padding_for(name: str, tensor: torch.Tensor, num_pad: int, ignore_index: int) -> torch.Tensor:
    shape = (num_pad, *tensor.shape[1:])
    if name == "labels":
        return tensor.new_full(shape, ignore_index)
    if name == "position_ids":  # a sequence of its own: positions restart at 0
        return torch.arange(num_pad, dtype=tensor.dtype, device=tensor.device).view(-1, *[1] * (tensor.dim() - 1)).expand(shape)
    return tensor.new_zeros(shape)  # masks False, advantages 0, token ids 0


def shard_packed_batch(
    cu_seqlens: torch.Tensor, group=None, *, ignore_index: int = -100, **per_token: torch.Tensor
) -> ShardedBatch:
    """Pad the packed batch to a multiple of the group size and keep this rank's slice of each tensor.

    ``per_token`` tensors have the packed tokens on dim 0 (``input_ids``, ``labels``,
    ``position_ids``, ``loss_mask``, ``advantages``, ``old_logprobs``, hidden states...). Padding
    is ``ignore_index`` for ``labels``, ``0..num_pad-1`` for ``position_ids`` and zeros otherwise.
    """
    world, rank = group_size(group), group_rank(group)
    if not per_token:
        raise ValueError("shard_packed_batch needs at least one per-token tensor")
    for name, tensor in per_token.items():
        check_tensor(name, tensor)
        if tensor.dim() == 0:
            raise ValueError(f"{name} must have the packed tokens on dim 0, got a 0-d tensor")
    total = next(iter(per_token.values())).shape[0]
    check_cu_seqlens("cu_seqlens", cu_seqlens, total)
    for name, tensor in per_token.items():
        if tensor.shape[0] != total:
            raise ValueError(f"{name}.shape[0] must equal the number of packed tokens ({total}), got {tuple(tensor.shape)}")
    padded_cu, num_pad = pad_cu_seqlens(cu_seqlens, world)
    local = (total + num_pad) // world
    start, stop = rank * local, (rank + 1) * local
    tensors = {}
    for name, tensor in per_token.items():
        shard = tensor[start:stop]  # a view: only a rank whose slice reaches into the padding copies
        if stop > total:
            padding = _padding_for(name, tensor, num_pad, ignore_index)[max(start, total) - total : stop - total]
            shard = torch.cat([shard, padding])
        tensors[name] = shard
    lengths = padded_cu[1:] - padded_cu[:-1]
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return ShardedBatch(tensors, padded_cu, max_seqlen, total, num_pad, rank, world)


def gather_per_token(x: torch.Tensor, group=None, num_tokens: int | None = None) -> torch.Tensor:
    """All ranks' shards of a per-token tensor, concatenated in token order, padding dropped.

    Only per-token values travel (log-probs, entropies: ``(local_tokens,)``), never hidden
    states or logits. Differentiable; the result is replicated on every rank. ``num_tokens`` (the real
    tokens, before padding) must be an int in ``[0, group size * local_tokens]``.
    """
    if num_tokens is not None:
        local = x.shape[0] if x.dim() > 0 else 0
        gathered = group_size(group) * local
        try:
            count = None if isinstance(num_tokens, bool) else operator.index(num_tokens)
        except TypeError:
            count = None
        if count is None or not 0 <= count <= gathered:
            raise ValueError(f"num_tokens must be an int in [0, {gathered}] (the tokens gathered: group size "
                             f"{group_size(group)} x {local} local tokens), got {num_tokens!r}")
        num_tokens = count
    full = all_gather_tokens(x, group)
    return full if num_tokens is None else full[:num_tokens]
