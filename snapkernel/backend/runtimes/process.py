"""The `process` runtime: the agent as a plain subprocess in its own process group and directory.

No isolation beyond that: for development, and as the GPU fallback where gVisor cannot drive the driver.
Limits: a cgroup v2 group (memory.max, cpu.max, pids.max) when the cgroup tree is writable, otherwise
rlimits (address space) and CPU affinity; `Sandbox.limits` says which was used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Self

from snapkernel.backend.runtimes.base import (
    DEFAULT_PIDS_LIMIT,
    Launch,
    RuntimeCapabilities,
    RuntimeInfo,
    RuntimeSettings,
    SandboxRuntime,
)
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.protocol.spec import ParsedSpec

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup2_base() -> Path | None:
    """`/sys/fs/cgroup/snapkernel` with cpu, memory and pids delegated, or None where that cannot be."""
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        return None
    base = CGROUP_ROOT / "snapkernel"
    try:
        base.mkdir(exist_ok=True)
        for parent in (CGROUP_ROOT, base):
            (parent / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    except OSError as e:
        log.info("cgroup v2 not writable (%s); using rlimits", e)
        return None
    return base


class ProcessRuntime(SandboxRuntime):
    name = "process"

    def __init__(self, pids_limit: int = DEFAULT_PIDS_LIMIT) -> None:
        super().__init__()
        self.pids_limit = pids_limit
        self.cgroup_base = _cgroup2_base()
        self._core_use: Counter[int] = Counter()
        self._cores: dict[str, list[int]] = {}

    @classmethod
    def from_settings(cls, settings: RuntimeSettings) -> Self:
        return cls(settings.pids_limit)

    @property
    def capabilities(self) -> RuntimeCapabilities:
        # No memory images (nothing holds a plain process's memory but the host), but a GPU kernel's process
        # can be suspended in place by the CUDA driver's checkpoint API (hibernation "suspend").
        return RuntimeCapabilities(gpu_suspend=True, disk_quota=True)

    def probe(self) -> RuntimeInfo:
        mode = "cgroup2" if self.cgroup_base else "rlimit"
        return RuntimeInfo(self.name, True, sys.version.split()[0],
                           f"plain subprocess, no isolation: kernels see the host's files and run as the "
                           f"backend's user (uid {os.geteuid()}); limits via {mode}")

    def prepare(self, record: SandboxRecord, spec: ParsedSpec, env: dict[str, str]) -> Launch:
        limits: dict[str, Any] = {"nofile": 65536}
        if spec.gpu is None:
            # An address-space limit makes a memory hog a MemoryError in its cell rather than an OOM kill of
            # the kernel. Not with GPUs: CUDA reserves far more address space than it ever touches.
            limits["memory"] = spec.memory
        mode = "rlimit"
        if self.cgroup_base is not None:
            group = self.cgroup_base / record.id
            try:
                group.mkdir(exist_ok=True)
                (group / "memory.max").write_text(str(spec.memory))
                (group / "cpu.max").write_text(f"{int(spec.cpu * 100000)} 100000")
                (group / "pids.max").write_text(str(self.pids_limit))
                limits["cgroup"] = str(group)
                mode = "cgroup2"
            except OSError as e:
                log.warning("sandbox_id=%s cgroup setup failed (%s); using rlimits", record.id, e)
        if mode == "rlimit":
            limits["cpus"] = self._pick_cores(record.id, spec.cpu)
        # The sandbox's temporary files (the kernel's sockets among them) go with the sandbox.
        tmp = Path(record.dir) / "tmp"
        tmp.mkdir(mode=0o700, exist_ok=True)
        env = {**env, "TMPDIR": str(tmp)}
        log.info("sandbox_id=%s limits via %s: cpu=%g memory=%d", record.id, mode, spec.cpu, spec.memory)
        return Launch([sys.executable, "-m", "snapkernel.agent"], env, limits, mode, cwd=spec.mount_dir)

    def _pick_cores(self, sandbox_id: str, cpu: float) -> list[int]:
        """The least used cores, as many as the cores asked for (rounded up)."""
        cores = sorted(os.sched_getaffinity(0), key=lambda c: self._core_use[c])
        chosen = sorted(cores[: max(1, min(len(cores), math.ceil(cpu)))])
        self._core_use.update(chosen)
        self._cores[sandbox_id] = chosen
        return chosen

    def set_memory_limit(self, record: SandboxRecord, nbytes: int) -> None:
        if self.cgroup_base is None or not (group := self.cgroup_base / record.id).is_dir():
            return
        used = int((group / "memory.current").read_text())
        if used > nbytes:  # lowering it under what the sandbox holds now would OOM-kill its kernel
            log.warning("sandbox_id=%s holds %d bytes, over its limit of %d; the limit stays above that",
                        record.id, used, nbytes)
            nbytes = used + (64 << 20)
        (group / "memory.max").write_text(str(nbytes))

    def set_cpu_limit(self, record: SandboxRecord, cores: float | None) -> None:
        """The cgroup's CPU quota (with rlimits the sandbox keeps its cores: the copies run on those)."""
        if self.cgroup_base is None or not (group := self.cgroup_base / record.id).is_dir():
            return
        try:
            (group / "cpu.max").write_text("max 100000" if cores is None else f"{int(cores * 100000)} 100000")
        except OSError as e:
            log.warning("sandbox_id=%s CPU limit not set to %s: %s", record.id, cores or "none", e)

    def cleanup(self, record: SandboxRecord) -> None:
        self._core_use.subtract(self._cores.pop(record.id, []))
        if self.cgroup_base is not None:
            with contextlib.suppress(OSError):
                (self.cgroup_base / record.id).rmdir()
