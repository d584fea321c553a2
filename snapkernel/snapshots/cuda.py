"""GPU memory of a sandbox's processes, moved to host memory and back with the CUDA driver's checkpoint API.

cuCheckpointProcessLock / Checkpoint / Restore / Unlock / GetState (driver >= 550) act on another process
by pid: after `suspend` the process holds no GPU memory and no context, so its GPU can go to another
sandbox; `resume` puts everything back where it was, bit for bit. Called in-process through ctypes on
libcuda (the `cuda-checkpoint` command line costs seconds per call). The calls block: run them in a thread.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import threading
import time
from dataclasses import dataclass, field

from snapkernel.errors import NoCapacityError, RuntimeUnavailableError, SandboxFailedError
from snapkernel.host.gpus import gpu_usage
from snapkernel.host.processes import sample_tree

log = logging.getLogger(__name__)

LOCK_TIMEOUT_MS = 10_000  # how long a lock waits for the process's CUDA work in flight to finish
_FUNCTIONS = ("cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
              "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock")


class ProcessState(enum.IntEnum):  # CUprocessState
    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


class _LockArgs(ctypes.Structure):  # CUcheckpointLockArgs
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class CudaDriver:
    """The checkpoint calls of libcuda. One per backend; `load()` says why it cannot be had."""

    _instance: CudaDriver | None = None
    _guard = threading.Lock()

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    @classmethod
    def load(cls) -> CudaDriver:
        with cls._guard:
            if cls._instance is None:
                try:
                    lib = ctypes.CDLL("libcuda.so.1")
                except OSError as e:
                    raise RuntimeUnavailableError(f"no CUDA driver here (libcuda.so.1: {e})") from e
                missing = [f for f in _FUNCTIONS if not hasattr(lib, f)]
                if missing:
                    raise RuntimeUnavailableError(
                        f"this NVIDIA driver has no checkpoint API ({', '.join(missing)} missing): GPU kernels "
                        "need driver 550 or newer to hibernate with their GPU memory")
                driver = cls(lib)
                driver._check(lib.cuInit(0), "cuInit")
                cls._instance = driver
            return cls._instance

    def _error(self, code: int) -> str:
        name = ctypes.c_char_p()
        self.lib.cuGetErrorName(code, ctypes.byref(name))
        return name.value.decode() if name.value else f"CUresult {code}"

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise SandboxFailedError(f"{what} failed: {self._error(code)}")

    def state(self, pid: int) -> ProcessState | None:
        """The process's checkpoint state; None when it holds no CUDA context."""
        value = ctypes.c_int(-1)
        if self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(value)) != 0:
            return None
        return ProcessState(value.value)

    def lock(self, pid: int) -> None:
        args = _LockArgs(timeoutMs=LOCK_TIMEOUT_MS)
        self._check(self.lib.cuCheckpointProcessLock(pid, ctypes.byref(args)), f"locking CUDA in pid {pid}")

    def checkpoint(self, pid: int) -> None:
        self._check(self.lib.cuCheckpointProcessCheckpoint(pid, None), f"checkpointing GPU memory of pid {pid}")

    def restore(self, pid: int) -> None:
        self._check(self.lib.cuCheckpointProcessRestore(pid, None), f"restoring GPU memory of pid {pid}")

    def unlock(self, pid: int) -> None:
        self._check(self.lib.cuCheckpointProcessUnlock(pid, None), f"unlocking CUDA in pid {pid}")


@dataclass
class Suspended:
    """What `suspend` moved out: the processes, and the GPU memory they held (bytes per GPU index)."""

    pids: list[int]
    gpu_bytes: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.gpu_bytes.values())


def cuda_processes(driver: CudaDriver, root_pid: int) -> list[int]:
    """The processes under `root_pid` (itself included) that hold a CUDA context."""
    return [p for p in sample_tree(root_pid).pids if driver.state(p) is not None]


def suspend(driver: CudaDriver, pids: list[int], held: dict[int, int]) -> Suspended:
    """Move the GPU memory of the CUDA processes `pids` into host memory. `held` is the GPU memory they
    had (per GPU index, see `gpu_memory_of`): what a resume must find free again.

    All processes are locked before any is checkpointed, so none of them waits on another mid-way; on a
    failure the ones already done are put back, and the sandbox runs on as before.
    """
    started = time.perf_counter()
    locked: list[int] = []
    checkpointed: list[int] = []
    try:
        for pid in pids:
            driver.lock(pid)
            locked.append(pid)
        for pid in pids:
            driver.checkpoint(pid)
            checkpointed.append(pid)
    except SandboxFailedError:
        _undo(driver, checkpointed, locked)
        raise
    return Suspended(pids, held, time.perf_counter() - started)


def resume(driver: CudaDriver, suspended: Suspended, gpu_indices: list[int]) -> float:
    """Put the GPU memory back (the GPUs must be free enough: a restore that runs out of GPU memory leaves
    the process stuck for good, so this checks first). Returns the seconds it took."""
    check_room(suspended.gpu_bytes, gpu_indices)
    started = time.perf_counter()
    for pid in suspended.pids:
        if driver.state(pid) == ProcessState.CHECKPOINTED:
            driver.restore(pid)
    for pid in suspended.pids:
        if driver.state(pid) == ProcessState.LOCKED:
            driver.unlock(pid)
    return time.perf_counter() - started


def _undo(driver: CudaDriver, checkpointed: list[int], locked: list[int]) -> None:
    for step, pids in ((driver.restore, checkpointed), (driver.unlock, locked)):
        for pid in pids:
            try:
                step(pid)
            except SandboxFailedError as e:
                log.error("pid=%s could not be put back after a failed suspend: %s", pid, e)


RESTORE_MARGIN = 256 << 20  # room a restore needs beyond the bytes it puts back (contexts, alignment)


def gpu_memory_of(pids: list[int], gpu_indices: list[int]) -> dict[int, int]:
    """Bytes of GPU memory the processes hold, per GPU index (NVML's per-process accounting)."""
    usages, why = gpu_usage(gpu_indices, pids)
    if len(usages) != len(gpu_indices):
        raise RuntimeUnavailableError(f"cannot read GPU memory from NVML: {why}")
    return {u.index: u.sandbox_memory_used for u in usages}


def free_memory(gpu_indices: list[int]) -> dict[int, int]:
    """NVML's free bytes per GPU index (not total - used: newer drivers also keep memory reserved)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        return {i: int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).free)
                for i in gpu_indices}
    finally:
        pynvml.nvmlShutdown()


def check_room(needed: dict[int, int], gpu_indices: list[int]) -> None:
    free = free_memory(gpu_indices)
    for index, want in needed.items():
        if free.get(index, 0) < want + RESTORE_MARGIN:
            raise NoCapacityError(
                f"GPU {index} has {free.get(index, 0) >> 20} MiB free; putting this kernel's GPU memory back "
                f"needs {(want + RESTORE_MARGIN) >> 20} MiB: another process on that GPU must free some first")
