"""Accounting of the host's CPU, memory and GPUs among sandboxes.

GPUs are exclusive: a sandbox gets whole GPUs that no other sandbox holds. CPU and memory are
limits per sandbox; the totals may be overcommitted by a configurable factor, as notebooks idle most of
the time.
"""

from __future__ import annotations

import os

from snapkernel.backend.gpus import GpuInfo
from snapkernel.backend.spec import GpuRequest, ParsedSpec, format_bytes
from snapkernel.backend.v1 import backend_pb2 as pb
from snapkernel.errors import NoCapacityError


def host_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


class Scheduler:
    def __init__(self, gpus: list[GpuInfo], cpu_overcommit: float, memory_overcommit: float) -> None:
        self.gpus = gpus
        self.cpu_total = float(os.cpu_count() or 1)
        self.memory_total = host_memory()
        self.cpu_overcommit = cpu_overcommit
        self.memory_overcommit = memory_overcommit
        self.cpu_allocated = 0.0
        self.memory_allocated = 0
        self.gpu_owner: dict[int, str] = {}  # GPU index -> sandbox id

    def _pick_gpus(self, req: GpuRequest) -> list[int]:
        matching = [g for g in self.gpus if req.model.lower() in ("any", g.model.lower(), g.name.lower())]
        if not matching:
            have = ", ".join(sorted({f"{g.model} ({g.name})" for g in self.gpus})) or "none"
            raise NoCapacityError(
                f"no GPU of model {req.model!r} here; these exist: {have}. Ask for one of those, "
                "'any:N', or no GPU"
            )
        free = [g.index for g in matching if g.index not in self.gpu_owner]
        if len(free) < req.count:
            raise NoCapacityError(
                f"asked for {req.count} GPU(s) of model {req.model!r}; {len(matching)} exist here and "
                f"{len(free)} are free. Shut down another GPU kernel or ask for fewer"
            )
        return free[: req.count]

    def allocate(self, sandbox_id: str, spec: ParsedSpec) -> list[int]:
        if spec.cpu > self.cpu_total:
            raise NoCapacityError(f"cpu {spec.cpu:g} is more than this host's {self.cpu_total:g} cores")
        if spec.memory > self.memory_total:
            raise NoCapacityError(
                f"memory {format_bytes(spec.memory)} is more than this host's {format_bytes(self.memory_total)}"
            )
        if self.cpu_allocated + spec.cpu > self.cpu_total * self.cpu_overcommit:
            raise NoCapacityError(
                f"no room for {spec.cpu:g} more cores: {self.cpu_allocated:g} of {self.cpu_total:g} "
                f"(x{self.cpu_overcommit:g} overcommit) are given out; stop a kernel or ask for fewer"
            )
        if self.memory_allocated + spec.memory > self.memory_total * self.memory_overcommit:
            raise NoCapacityError(
                f"no room for {format_bytes(spec.memory)} more memory: {format_bytes(self.memory_allocated)} "
                f"of {format_bytes(self.memory_total)} are given out; stop a kernel or ask for less"
            )
        indices = self._pick_gpus(spec.gpu) if spec.gpu else []
        self.claim(sandbox_id, spec.cpu, spec.memory, indices)
        return indices

    def claim(self, sandbox_id: str, cpu: float, memory: int, gpu_indices: list[int]) -> None:
        """Record an allocation (also used when re-adopting sandboxes after a restart)."""
        self.cpu_allocated += cpu
        self.memory_allocated += memory
        for i in gpu_indices:
            self.gpu_owner[i] = sandbox_id

    def release(self, sandbox_id: str, cpu: float, memory: int) -> None:
        self.cpu_allocated = max(0.0, self.cpu_allocated - cpu)
        self.memory_allocated = max(0, self.memory_allocated - memory)
        for i in [i for i, owner in self.gpu_owner.items() if owner == sandbox_id]:
            del self.gpu_owner[i]

    def capacity(self) -> pb.Capacity:
        return pb.Capacity(
            cpu_total=self.cpu_total, cpu_allocated=self.cpu_allocated,
            memory_total=self.memory_total, memory_allocated=self.memory_allocated,
            gpus_total=len(self.gpus), gpus_allocated=len(self.gpu_owner),
        )
