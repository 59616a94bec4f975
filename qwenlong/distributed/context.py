"""Who this process is in a multi-process run: ranks, sequence-parallel and data-parallel groups.

``torchrun`` (or the ``deepspeed`` launcher) starts one process per device and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init_distributed`` reads
them. Ranks are laid out as ``rank = dp_rank * sp_size + sp_rank``: the ranks of one
sequence-parallel group are consecutive and hold the same micro-batches, each a token shard.
Without those variables the run is one process, with no process group at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from qwenlong.config.schema import DistributedConfig


@dataclass
class DistributedContext:
    """This process's place in the run; the defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sp_size: int = 1
    sp_group: Any = None  # None when sp_size == 1: the trainers then run whole packed batches
    device: torch.device = torch.device("cpu")

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Each value summed over every rank (one all-reduce for all of them)."""
        if self.world_size == 1 or not values:
            return values
        names = sorted(values)
        # on the context's device: NCCL serves CUDA tensors only
        total = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return dict(zip(names, total.tolist(), strict=True))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (picklable Python objects)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(cfg: DistributedConfig, timeout: timedelta = timedelta(minutes=30)) -> DistributedContext:
    """Join the process group the launcher describes (or reuse one already initialized) and build the
    sequence-parallel groups. A plain ``python -m qwenlong ...`` is a single process."""
    from qwenlong.kernels import new_sequence_parallel_groups

    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if world_size == 1 and not dist.is_initialized():
        if cfg.sp_size > 1 or cfg.deepspeed_stage > 0:
            raise ValueError(f"distributed: sp_size={cfg.sp_size} / deepspeed_stage={cfg.deepspeed_stage} need "
                             "several processes: launch with torchrun, e.g. torchrun --nproc-per-node 2 -m qwenlong")
        if backend != "nccl":
            return DistributedContext()
        # no process group, but the run still goes to the GPU: Run moves the model to ctx.device
        torch.cuda.set_device(local_rank)
        return DistributedContext(local_rank=local_rank, device=torch.device("cuda", local_rank))
    if world_size % cfg.sp_size != 0:
        raise ValueError(f"distributed.sp_size: must divide the number of processes ({world_size}), got {cfg.sp_size}")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)  # before any collective: NCCL's object collectives use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    # token counts are known to every rank (each knows the whole step's schedule), so only the SP group is needed
    sp_group = new_sequence_parallel_groups(cfg.sp_size, timeout)[0] if cfg.sp_size > 1 else None
    return DistributedContext(dist.get_rank(), world_size, local_rank, cfg.sp_size, sp_group, device)
