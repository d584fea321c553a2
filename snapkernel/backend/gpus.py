"""The host's NVIDIA GPUs, read through NVML (nvidia-ml-py)."""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

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
