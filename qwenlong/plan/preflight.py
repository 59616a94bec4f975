"""The plan's check before a run starts (``qwenlong pipeline``, ``sft``, ``rl``): refuse a run that cannot fit."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from qwenlong.config.schema import Config
from qwenlong.plan.hardware import GPUS, Device, host_device
from qwenlong.plan.report import make_plan

log = logging.getLogger(__name__)


def this_device(world: int = 1) -> Device:
    """The GPU this process runs on (its real memory; bandwidth and FLOPs of the closest known kind), or the host,
    whose RAM the ``world`` processes of the run share (``host_device``: the share ``qwenlong plan --gpu cpu``
    gives each too)."""
    import torch

    if not torch.cuda.is_available():
        return host_device(world)
    # this runs before init_distributed sets the device: name this rank's GPU, and read its properties, which
    # need no CUDA context (mem_get_info would create one on the current GPU, GPU 0, in every rank)
    props = torch.cuda.get_device_properties(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    name = props.name.lower()
    kind = next((GPUS[k] for k in GPUS if k.split("-")[0] in name), GPUS["h100-80gb"])
    return replace(kind, name=name, memory_bytes=props.total_memory)


def preflight(cfg: Config, world_size: int | None = None, device: Device | None = None) -> str | None:
    """None when the plan says the run fits (or cannot plan it), else the plan's one-line verdict."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    try:
        plan = make_plan(cfg, world, device if device is not None else this_device(world))
    except ValueError as error:  # e.g. a hub model the planner has no shape for, or an attention it does not model
        log.warning("qwenlong plan: cannot check this run (%s); starting it unchecked", error)
        return None
    return None if plan.fits else plan.verdict()
