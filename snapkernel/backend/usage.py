"""What a sandbox uses now: CPU and memory of its process tree (from /proc), its GPUs from NVML.

The process tree is the sandbox's supervisor (`Sandbox.pid`) and every descendant: the agent and kernel for
the `process` runtime, runsc's sandbox and gofer for `gvisor`. Everything degrades cleanly: no NVML means no
GPU figures (with the reason in `gpu_detail`), a process that vanished mid-read is skipped.
"""

from __future__ import annotations

import logging
import time

from snapkernel.host.gpus import gpu_usage
from snapkernel.host.processes import ProcessSample, sample_tree
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)


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
