"""What a sandbox uses now: CPU and memory of its process tree (from /proc), its GPUs from NVML.

The process tree is the sandbox's supervisor (`Sandbox.pid`) and every descendant: the agent and kernel for
the `process` runtime, runsc's sandbox and gofer for `gvisor`. Everything degrades cleanly: no NVML means no
GPU figures (with the reason in `gpu_detail`), a process that vanished mid-read is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapkernel.backend.gpus import short_model
from snapkernel.backend.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ProcessSample:
    pids: list[int]
    cpu_seconds: float
    memory: int  # bytes resident
    taken: float  # time.monotonic()


def _stat(pid: int) -> tuple[int, float, int] | None:
    """(parent pid, CPU seconds, resident bytes) of one process, or None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = text[text.rindex(")") + 2:].split()
    ppid, utime, stime, rss = int(fields[1]), int(fields[11]), int(fields[12]), int(fields[21])
    return ppid, (utime + stime) / _TICKS, rss * _PAGE


def sample_tree(root: int) -> ProcessSample:
    """CPU time and resident memory of `root` and all its descendants."""
    stats: dict[int, tuple[int, float, int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    pids: list[int] = []
    todo = [root] if root in stats else []
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return ProcessSample(pids=sorted(pids), cpu_seconds=sum(stats[p][1] for p in pids),
                         memory=sum(stats[p][2] for p in pids), taken=time.monotonic())


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


class UsageSampler:
    """Samples sandboxes; CPU percent is measured between samples of the same sandbox at least MIN_INTERVAL
    apart (a sandbox's first sample waits that long; one asked for sooner repeats the last rate)."""

    MIN_INTERVAL = 0.25  # seconds
    FORGET_AFTER = 600.0  # seconds

    def __init__(self) -> None:
        self._last: dict[str, tuple[ProcessSample, float]] = {}  # sandbox id -> (sample, CPU percent then)

    def forget(self, sandbox_id: str) -> None:
        self._last.pop(sandbox_id, None)

    def _cpu_percent(self, sandbox_id: str, root: int, now: ProcessSample) -> tuple[ProcessSample, float]:
        last = self._last.get(sandbox_id)
        if last is not None and now.taken - last[0].taken < self.MIN_INTERVAL:
            return now, last[1]
        if last is None:
            time.sleep(self.MIN_INTERVAL)
            before, now = now, sample_tree(root)
        else:
            before = last[0]
        elapsed = now.taken - before.taken
        percent = max(0.0, now.cpu_seconds - before.cpu_seconds) / elapsed * 100
        self._last[sandbox_id] = (now, percent)
        return now, percent

    def sample(self, sandbox: pb.Sandbox, cpu_limit: float, memory_limit: int) -> pb.SandboxUsage:
        """Blocking (reads /proc, calls NVML, may sleep MIN_INTERVAL): run it in a thread."""
        usage = pb.SandboxUsage(sandbox_id=sandbox.id, state=sandbox.state, cpu_limit=cpu_limit,
                                memory_limit=memory_limit, sampled=time.time())
        if sandbox.pid <= 0 or sandbox.state in (pb.HIBERNATED, pb.EXITED, pb.LOST, pb.FAILED, pb.DELETED):
            self.forget(sandbox.id)  # nothing runs: all zero
            return usage
        now = sample_tree(sandbox.pid)
        for old in [k for k, (v, _) in self._last.items() if now.taken - v.taken > self.FORGET_AFTER]:
            del self._last[old]  # sandboxes nobody asked about for a while, deleted ones among them
        now, usage.cpu_percent = self._cpu_percent(sandbox.id, sandbox.pid, now)
        usage.cpu_seconds = now.cpu_seconds
        usage.memory_used = now.memory
        usage.processes = len(now.pids)
        gpus, why = gpu_usage(sandbox.gpu_indices, now.pids)
        usage.gpus.extend(gpus)
        usage.gpu_detail = why
        log.debug("sandbox_id=%s usage cpu=%.1f%% memory=%d gpus=%d", sandbox.id, usage.cpu_percent,
                  usage.memory_used, len(gpus))
        return usage
