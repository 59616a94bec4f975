"""flash-attn's ``all_gather`` (``flash_attn.utils.distributed``): concatenate every rank's tensor along dim 0."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather(input_: torch.Tensor, process_group) -> torch.Tensor:
    world_size = dist.get_world_size(process_group)
    output = input_.new_empty(world_size * input_.shape[0], *input_.shape[1:])
    dist.all_gather_into_tensor(output, input_.contiguous(), group=process_group)
    return output
