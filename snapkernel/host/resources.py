"""What this host has to give out, read once at start-up and handed to the accounting (`Scheduler`), which
reads no host facts itself: a cluster's node daemon or a test hands it another host's numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from snapkernel.host.gpus import GpuInfo


@dataclass(frozen=True)
class HostResources:
    cpus: float
    memory: int  # bytes
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)

    @classmethod
    def local(cls, gpus: list[GpuInfo]) -> HostResources:
        """This machine: its cores, its memory (/proc/meminfo), and the GPUs NVML listed."""
        return cls(float(os.cpu_count() or 1), host_memory(), tuple(gpus))


def host_memory(field: str = "MemTotal") -> int:
    """Bytes of /proc/meminfo's `field` ("MemTotal", "MemAvailable"); 0 where it is not there."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0
