"""Multi-process training: process groups from the launcher and the backends that update the policy.

Launch one process per device with either launcher (``distributed.*`` in the config picks the strategy):

    torchrun --nproc-per-node 8 -m qwenlong pipeline --config configs/qwenlong-l1-32b.yaml
    deepspeed --num_gpus 8 --no_local_rank --module qwenlong pipeline --config configs/qwenlong-l1-32b.yaml

On CPU both run on gloo (``DS_ACCELERATOR=cpu`` is set for DeepSpeed when no GPU is present).
In code:

    ctx = init_distributed(cfg.distributed)          # torchrun / deepspeed env vars, SP groups
    backend = build_backend(model, ctx, cfg.distributed)
    SFTTrainer(model, examples, cfg.sft, backend=backend, ...)
"""

from __future__ import annotations

import torch

from qwenlong.config.schema import DistributedConfig
from qwenlong.distributed.backend import TrainingBackend
from qwenlong.distributed.context import DistributedContext, init_distributed


def build_backend(model: torch.nn.Module, ctx: DistributedContext, cfg: DistributedConfig) -> TrainingBackend:
    """DeepSpeed ZeRO when ``deepspeed_stage`` > 0, else plain PyTorch (one process or summed gradients)."""
    if cfg.deepspeed_stage > 0:
        from qwenlong.distributed.zero import DeepSpeedBackend

        return DeepSpeedBackend(model, ctx, cfg)
    return TrainingBackend(model, ctx)


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are ZeRO-3 partitions (created under ``deepspeed.zero.Init``)."""
    return hasattr(next(model.parameters()), "ds_id")


__all__ = ["DistributedContext", "TrainingBackend", "build_backend", "init_distributed", "is_partitioned"]
