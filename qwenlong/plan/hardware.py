"""Accelerators the planner knows: memory, HBM bandwidth, dense bf16 throughput, interconnect.

Figures are the vendors' published SXM numbers (dense, no sparsity); memory is what the device
reports (``torch.cuda.mem_get_info`` total), not the marketing GB.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    hbm_bytes_per_s: float
    bf16_flops: float
    nvlink_bytes_per_s: float  # one direction, per GPU, inside a node
    network_bytes_per_s: float  # per GPU, between nodes (one 400 Gb/s NIC per GPU)
    pcie_bytes_per_s: float  # host <-> device, for offloaded parameters
    gpus_per_node: int = 8
    cuda: bool = True


GPUS: dict[str, Device] = {
    "h100-80gb": Device("h100-80gb", 81559 << 20, 3.35e12, 989e12, 450e9, 50e9, 55e9),
    "h200-141gb": Device("h200-141gb", 143771 << 20, 4.8e12, 989e12, 450e9, 50e9, 55e9),
    "a100-80gb": Device("a100-80gb", 81920 << 20, 2.039e12, 312e12, 300e9, 25e9, 25e9),
}


def host_device(processes: int = 1) -> Device:
    """This machine's CPU and RAM, for runs on ``cpu`` (the tiny presets). The ``processes`` of a run share the
    RAM, each holding its own model, gradients and activations, so each is given ``1/processes`` of the total:
    ``qwenlong plan --gpu cpu --gpus N`` and the pre-flight check of an N-process run (``preflight``) both
    take this share, so they give the same verdict."""
    if processes < 1:
        raise ValueError(f"processes: must be >= 1, got {processes}")
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return Device("cpu", pages * page_size // processes, 20e9, 1e11, 10e9, 10e9, 10e9, gpus_per_node=1, cuda=False)


def device(name: str, processes: int = 1) -> Device:
    """The device kind ``name`` (a key of ``GPUS``, or ``cpu``: this host's RAM shared by ``processes``)."""
    if name == "cpu":
        return host_device(processes)
    if name not in GPUS:
        raise ValueError(f"gpu: expected one of {', '.join(GPUS)} or cpu, got {name!r}")
    return GPUS[name]
