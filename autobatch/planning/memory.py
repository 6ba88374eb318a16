"""The memory probe: how much memory the device that torch computes on can still give us.

    >>> memory = probe(torch.device("cuda:0"))   # NVML, falling back to torch.cuda.mem_get_info
    >>> memory.capacity_bytes                    # what this process's tensors may hold in all
    >>> budget(memory, "6GiB").budget_bytes      # capped by the user, less the safety margin
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import psutil
import torch

from autobatch.sizes import format_bytes, parse_bytes

__all__ = ["Budget", "DeviceMemory", "budget", "probe"]

log = logging.getLogger(__name__)

#: Share of the budget kept free for the allocator's fragmentation and what the fit cannot see.
SAFETY_MARGIN = 0.10


@dataclass(frozen=True)
class DeviceMemory:
    """What the probe read: ``capacity_bytes`` = free memory + what this process already holds."""

    device: str
    name: str
    total_bytes: int
    free_bytes: int
    held_bytes: int
    source: str

    @property
    def capacity_bytes(self) -> int:
        return self.free_bytes + self.held_bytes


@dataclass(frozen=True)
class Budget:
    """The bytes a training step's peak may reach, and how they were arrived at."""

    budget_bytes: int
    capacity_bytes: int
    cap_bytes: Optional[int]
    margin: float

    def describe(self) -> str:
        cap = f", capped at {format_bytes(self.cap_bytes)}" if self.cap_bytes is not None else ""
        return (f"{format_bytes(self.budget_bytes)} ({format_bytes(self.capacity_bytes)} available{cap}, "
                f"less a {self.margin:.0%} safety margin)")


def budget(memory: DeviceMemory, memory_budget: Union[int, float, str, None] = None,
           margin: float = SAFETY_MARGIN) -> Budget:
    """The step's peak budget: the device's capacity, capped by ``memory_budget`` (bytes as an int or
    a string such as "6GiB", or a fraction of the device's total memory as a float in (0, 1])."""
    if memory_budget is None:
        cap = None
    elif isinstance(memory_budget, float):
        cap = int(memory_budget * memory.total_bytes)
    elif isinstance(memory_budget, str):
        cap = parse_bytes(memory_budget)
    else:
        cap = memory_budget
    if cap is not None and cap > memory.capacity_bytes:
        log.warning("memory_budget %s is more than %s has free (%s): the budget is capped there", format_bytes(cap),
                    memory.device, format_bytes(memory.capacity_bytes))
    usable = memory.capacity_bytes if cap is None else min(cap, memory.capacity_bytes)
    return Budget(int(usable * (1 - margin)), memory.capacity_bytes, cap, margin)


def probe(device: torch.device, resident_bytes: int = 0) -> DeviceMemory:
    """Read the memory of ``device``: NVML (or torch) on CUDA, psutil on the host.

    On the host, ``resident_bytes`` (the model's and optimizer's tensors) counts as held: a measured
    peak includes them, while psutil's available memory already excludes them.
    """
    if device.type == "cuda":
        return _probe_cuda(device)
    if device.type != "cpu":
        raise ValueError(f"autobatch measures memory on 'cuda' and 'cpu' devices, not {device.type!r}; "
                         "pass micro_batch as an int")
    vm = psutil.virtual_memory()
    return DeviceMemory(str(device), "host", vm.total, vm.available, resident_bytes, "psutil")


def _probe_cuda(device: torch.device) -> DeviceMemory:
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    allocated = torch.cuda.memory_allocated(index)
    reserved_unused = torch.cuda.memory_reserved(index) - allocated
    try:
        free, total = _nvml_free_and_total(props)
        source = "nvml"
    except Exception as error:  # noqa: BLE001 - any NVML failure falls back, with its reason logged
        log.warning("NVML could not read %s's memory (%s); using torch.cuda.mem_get_info instead",
                    props.name, error)
        free, total = torch.cuda.mem_get_info(index)
        source = "torch.cuda.mem_get_info"
    return DeviceMemory(f"cuda:{index}", props.name, total, free + reserved_unused, allocated, source)


def _nvml_free_and_total(props) -> tuple[int, int]:
    """NVML's free and total memory of the GPU behind ``props``, found by UUID or PCI bus id so that
    CUDA_VISIBLE_DEVICES renumbering cannot point at another GPU."""
    import pynvml

    pynvml.nvmlInit()
    try:
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        else:
            bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.free), int(info.total)
    finally:
        pynvml.nvmlShutdown()
