"""The plan's check before a run starts (``qwenlong pipeline``, ``sft``, ``rl``): refuse a run that cannot fit."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from qwenlong.config.schema import Config
from qwenlong.plan.hardware import GPUS, Device, host_device
from qwenlong.plan.report import make_plan

log = logging.getLogger(__name__)


def this_device() -> Device:
    """The GPU this process runs on (its real memory; bandwidth and FLOPs of the closest known kind), or the host.
    On CPU every process of the run shares the RAM, so each is given its share."""
    import torch

    if not torch.cuda.is_available():
        host = host_device()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return replace(host, memory_bytes=host.memory_bytes // max(world, 1))
    name = torch.cuda.get_device_name().lower()
    kind = next((GPUS[k] for k in GPUS if k.split("-")[0] in name), GPUS["h100-80gb"])
    _, total = torch.cuda.mem_get_info()
    return replace(kind, name=name, memory_bytes=total)


def preflight(cfg: Config, world_size: int | None = None, device: Device | None = None) -> str | None:
    """None when the plan says the run fits (or cannot plan its model), else the plan's one-line verdict."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    dev = device if device is not None else this_device()
    try:
        plan = make_plan(cfg, world, dev)
    except ValueError as error:  # e.g. a hub model the planner has no shape for
        log.warning("qwenlong plan: cannot check this run (%s); starting it unchecked", error)
        return None
    return None if plan.fits else plan.verdict()
