"""Merging into a live model, one tensor at a time, whole or partitioned over ranks (DeepSpeed ZeRO-3).

The pipeline's memory-agent stage merges the model it has just trained (the memory expert: the
model's own weights) with weights on disk (the phase's policy and the base it started from). Under
ZeRO-3 no rank holds the model whole, so :func:`merge_into_model` visits its floating-point tensors
(parameters and persistent buffers; a tied weight once, under its first name) one at a time:

1. rank 0 gets the tensor whole: a partitioned parameter is gathered from every rank's partition
   (``deepspeed.zero.GatheredParameters``);
2. rank 0 alone reads the same-named tensors of the sources (memory-mapped checkpoints or safetensors
   files, read when asked for; a released checkpoint by the model's parameter names, so a Mixture-of-Experts
   parameter fusing the experts is built from its per-expert tensors, see ``safetensors_weights``) and
   replaces the tensor by ``merge(base, [*others, tensor])``, on the tensor's device;
3. the result reaches every rank: a partitioned parameter is split into each rank's partition as the
   gather closes (``modifier_rank=0``); a tensor every rank holds whole is broadcast from rank 0.

So the merge is computed once, every rank ends with the same weights, and no rank holds more than one
whole tensor (rank 0: one per source) besides its own share. Without a process group it is the plain
in-place merge of a whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from qwenlong.distributed.zero import WholeWeights, import_deepspeed, open_checked_on_rank0, shape_problems
from qwenlong.merge.streaming import TensorMerge

# rank 0's sources: (base, the other merged models), opened when the merge starts
OpenSources = Callable[[], tuple[WholeWeights, Sequence[WholeWeights]]]


def float_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of every floating-point parameter and persistent buffer, a tied tensor once (its first name)."""
    seen: set[int] = set()
    tensors = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen and tensor.is_floating_point():
            seen.add(id(tensor))
            tensors.append((name, tensor))
    return tensors


def _partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def source_mismatches(base: WholeWeights, others: Sequence[WholeWeights],
                      tensors: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """What keeps the sources from being merged with ``tensors`` (a tensor missing or of another shape), or None."""
    problems = [f"{label}: {problem}"
                for label, source in [("base", base), *((f"model {i}", o) for i, o in enumerate(others))]
                for problem in shape_problems(source, tensors)]
    if not problems:
        return None
    return f"{len(problems)} problem(s): {'; '.join(problems[:5])}"


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextmanager
def _whole(tensor: torch.Tensor) -> Iterator[None]:
    """``tensor`` whole while open; rank 0's value is every rank's when it closes (partitioned: re-split)."""
    if _partitioned(tensor):
        with import_deepspeed().zero.GatheredParameters([tensor], modifier_rank=0):
            yield
    else:
        yield
        if _world() > 1:
            dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def merge_into_model(model: torch.nn.Module, open_sources: OpenSources | None, merge: TensorMerge) -> int:
    """Replace each floating-point tensor of ``model`` by ``merge(base, [*others, tensor])`` (module docstring).

    Every rank of the process group calls it (or the one process, without a group); ``open_sources`` on
    rank 0 only (None elsewhere). Rank 0 first checks every name and shape: sources that cannot be opened,
    or lack a tensor or hold one of another shape, raise the same ValueError on every rank (no rank is left
    waiting in a gather). Returns the number of tensors merged.
    """
    rank = dist.get_rank() if _world() > 1 else 0
    if (open_sources is None) != (rank != 0):
        raise ValueError(f"open_sources: give it on rank 0 and only there (rank {rank} got "
                         f"{'none' if open_sources is None else 'one'})")
    tensors = float_tensors(model)
    sources, problem = open_checked_on_rank0(open_sources, lambda sources: source_mismatches(*sources, tensors))
    try:
        if problem is not None:
            raise ValueError(f"merge sources: {problem}")
        for name, tensor in tensors:
            with _whole(tensor):
                if sources is not None:
                    base, others = sources
                    device = tensor.device
                    base_tensor = base.read(name).to(device)
                    other_tensors = [o.read(name).to(device) for o in others]
                    # the merge returns its base's dtype: a base read narrower than the model (bf16 files, an
                    # fp32 model) would round every merged weight to bf16, wiping out deltas below its precision
                    wide = base_tensor.dtype
                    for t in (*other_tensors, tensor):
                        wide = torch.promote_types(wide, t.dtype)
                    merged = merge(base_tensor.to(wide), [*other_tensors, tensor.data])
                    tensor.data.copy_(merged)
    finally:
        if sources is not None:
            for source in (sources[0], *sources[1]):
                source.close()
    return len(tensors)
