"""The host's NVIDIA GPUs and what processes use of them, read through NVML (nvidia-ml-py)."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

_VENDOR_WORDS = {"NVIDIA", "TESLA", "GEFORCE", "QUADRO"}


@dataclass
class GpuInfo:
    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int = 0
    utilization: int = 0

    @property
    def model(self) -> str:
        return short_model(self.name)


def short_model(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'H100'; 'NVIDIA A100-SXM4-80GB' → 'A100'; 'GeForce RTX 4090' → 'RTX4090'."""
    words = [w for w in re.split(r"[\s-]+", name) if w and w.upper() not in _VENDOR_WORDS]
    if not words:
        return name
    if words[0].upper() in {"RTX", "GTX"} and len(words) > 1:
        return words[0].upper() + words[1]
    return words[0]


def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def inventory() -> tuple[list[GpuInfo], str, str]:
    """(GPUs, driver version, why none were found) — never raises: no NVML simply means no GPUs."""
    try:
        nvml = _nvml()
    except Exception as e:
        return [], "", f"no NVIDIA GPU here (NVML: {e})"
    try:
        driver = nvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            uuid = nvml.nvmlDeviceGetUUID(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            try:
                util = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:
                util = 0
            gpus.append(GpuInfo(
                index=i,
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                name=name.decode() if isinstance(name, bytes) else name,
                memory_total=int(mem.total), memory_used=int(mem.used), utilization=util,
            ))
        return gpus, driver, "" if gpus else "NVML found no GPU"
    except Exception as e:
        log.warning("NVML inventory failed: %s", e)
        return [], "", f"NVML inventory failed: {e}"
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_usage(indices: Iterable[int], pids: Iterable[int]) -> tuple[list[pb.GpuUsage], str]:
    """NVML figures for the GPUs at `indices`, with the memory of processes in `pids` on each.

    Returns (usages, why some are missing); never raises.
    """
    indices = list(indices)
    if not indices:
        return [], ""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
    except Exception as e:
        return [], f"no GPU figures: NVML is not available ({e})"
    own = set(pids)
    usages, problems = [], []
    try:
        for index in indices:
            try:
                h = nvml.nvmlDeviceGetHandleByIndex(index)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                usage = pb.GpuUsage(index=index, model=short_model(_text(nvml.nvmlDeviceGetName(h))),
                                    memory_used=int(mem.used), memory_total=int(mem.total))
            except Exception as e:
                problems.append(f"GPU {index}: {e}")
                continue
            with contextlib.suppress(Exception):
                usage.utilization = int(nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            try:
                procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
                # usedGpuMemory is None where the driver hides it (some containers, MIG, WDDM).
                known = [p for p in procs if p.pid in own and p.usedGpuMemory is not None]
                usage.sandbox_memory_used = sum(int(p.usedGpuMemory) for p in known)
                usage.sandbox_memory_known = bool(known) or not any(p.pid in own for p in procs)
            except Exception as e:
                problems.append(f"GPU {index} processes: {e}")
            usages.append(usage)
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    return usages, "; ".join(problems)
