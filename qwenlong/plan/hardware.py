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


def host_device() -> Device:
    """This machine's CPU and RAM, for runs on ``cpu`` (the tiny presets): the memory is the RAM total."""
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return Device("cpu", pages * page_size, 20e9, 1e11, 10e9, 10e9, 10e9, gpus_per_node=1, cuda=False)


def device(name: str) -> Device:
    if name == "cpu":
        return host_device()
    if name not in GPUS:
        raise ValueError(f"gpu: expected one of {', '.join(GPUS)} or cpu, got {name!r}")
    return GPUS[name]
