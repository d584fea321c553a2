"""Runs inside a kernel: moves its torch CUDA tensors to host memory and back, in place.

The fast path of GPU hibernation. The driver's checkpoint moves GPU memory at about 2 GiB/s; a copy
into pinned host memory runs at the PCIe bandwidth (about 50 GiB/s on an H100). So before the driver
checkpoint, each CUDA storage is copied out and shrunk to nothing (`resize_(0)`, as FSDP frees
parameters), which leaves the driver only the context and caches to move; on waking each storage is
grown back and refilled. Storages keep their identity, so every tensor and view over them stays valid.
Raw pointers captured elsewhere would go stale: when the kernel holds CUDA graphs, `offload` leaves
everything in place and the driver moves it all. Storages torch cannot resize (memory it took from another
library through DLPack) stay in place too. (Torch memory that another library holds a zero-copy view of,
e.g. exported through DLPack, is not detected; the backend's `gpu_offload` setting turns this path off.)

How the bytes travel (the plan is `staging.py`'s): pinning GiBs of host memory on every suspend
(cudaHostAlloc, or cudaHostRegister: both fault in, pin and map every page) runs at about 2 GiB/s and
unpinning them again takes seconds, so the copies are pageable host memory, one anonymous mapping per
offload (the *arena*, with transparent huge pages asked for, so that faulting it in is 512 times fewer
faults and freeing it is one munmap). The GPU cannot copy into pageable memory at full speed, so the
bytes go through a few pinned *staging buffers* (`DEFAULT_BUFFERS` of `DEFAULT_BUFFER_BYTES`, allocated
on the first offload and kept for the kernel's life): the GPU copies a batch into one buffer on a side
stream while the CPU copies the batch before it out of another into the arena, on torch's threads, one
per core (the backend lifts the kernel's CPU quota meanwhile). Waking runs the other way. Why not pin the
arena itself in chunks (cudaHostRegister) and skip the CPU copy: registering costs what cudaHostAlloc
costs per byte (the kernel pins and maps every page, on one thread), then unregistering again; faulting
in pageable memory and copying into it run on every core.

Only ever called in a kernel that has torch's CUDA initialized (the backend runs it through
`hibernation.OFFLOAD_CODE`); elsewhere `offload` finds nothing to move and says so.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import mmap
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from snapkernel.snapshots.staging import (
    D2H,
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFERS,
    DRAIN,
    FILL,
    H2D,
    WAIT,
    Layout,
    Step,
    check_staging,
    layout,
    offload_steps,
    reload_steps,
)

GiB = 1024**3
MAX_THREADS = 32  # more threads than this add nothing to a memory-bound copy


class _Parked:
    """The storages one `offload` moved out, and the arena that holds their bytes."""

    def __init__(self, storages: list[Any], plan: Layout, buffers: int, arena: mmap.mmap, host: Any) -> None:
        self.storages = storages
        self.plan = plan
        self.buffers = buffers  # how many staging buffers of plan.buffer_bytes it went out through
        self.arena = arena
        self.host = host  # a uint8 CPU tensor over the arena

    def close(self) -> None:
        self.storages, self.host = [], None
        with contextlib.suppress(BufferError):  # a view of it still lives somewhere: the GC unmaps it later
            self.arena.close()


_offloaded: list[_Parked] = []
_spent: list[_Parked] = []  # put back by `reload`, freed by `release` (after the waiting cells have run)
_staging: list[Any] = []  # the pinned staging buffers (uint8 CPU tensors), kept across suspends
_streams: dict[int, Any] = {}  # device index -> the side stream the copies run on


def _torch() -> Any:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        raise RuntimeError("snapkernel's GPU offload moves torch CUDA tensors, but this process has not "
                           "initialized torch's CUDA")
    return torch


def _scan(torch: Any) -> tuple[list[Any], int, bool]:
    """The distinct non-empty CUDA storages of all live tensors that can move (by device, then address);
    how many cannot; and whether any CUDA graph is alive. A storage torch cannot resize (memory it did not
    allocate, e.g. taken from another library through DLPack) stays in place for the driver's checkpoint,
    and so does any other storage at its address (moving that one would pull the memory from under it)."""
    seen: dict[int, Any] = {}
    fixed: set[int] = set()
    graphs = False
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor):
            if obj.is_cuda:
                storage = obj.untyped_storage()
                if storage.nbytes():
                    seen.setdefault(storage.data_ptr(), storage)
                    if not getattr(storage, "resizable", lambda: True)():
                        fixed.add(storage.data_ptr())
        elif isinstance(obj, torch.cuda.CUDAGraph):
            graphs = True
    movable = [s for ptr, s in seen.items() if ptr not in fixed]
    return sorted(movable, key=lambda s: (s.device.index, s.data_ptr())), len(fixed), graphs


def _staging_buffers(torch: Any, buffers: int, buffer_bytes: int) -> float:
    """Make sure `_staging` is `buffers` pinned buffers of `buffer_bytes`; returns the seconds spent
    allocating them (0 when they were there already)."""
    if len(_staging) == buffers and all(b.numel() == buffer_bytes for b in _staging):
        return 0.0
    _staging.clear()
    started = time.perf_counter()
    _staging.extend(torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(buffers))
    return time.perf_counter() - started


def _side_streams(torch: Any, devices: list[int]) -> dict[int, Any]:
    for d in devices:
        if d not in _streams:
            _streams[d] = torch.cuda.Stream(device=d)
    return {d: _streams[d] for d in devices}


def _arena(torch: Any, nbytes: int, huge_pages: bool) -> tuple[mmap.mmap, Any]:
    arena = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # transparent huge pages off: 4 KiB pages, still correct
            arena.madvise(mmap.MADV_HUGEPAGE)
    return arena, torch.frombuffer(arena, dtype=torch.uint8)


def _bytes_of(torch: Any, storage: Any) -> Any:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@contextlib.contextmanager
def _all_threads(torch: Any) -> Iterator[int]:
    """torch's CPU copies on every core this process may use, up to `MAX_THREADS` (the kernel is idle
    meanwhile, and the backend lifts its CPU quota), then back."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(cores, MAX_THREADS)
    if cores > before:
        torch.set_num_threads(cores)
    try:
        yield max(cores, before)
    finally:
        if cores > before:
            torch.set_num_threads(before)


def _carry_out(torch: Any, steps: list[Step], *, plan: Layout, views: list[Any], host: Any,
               streams: dict[int, Any]) -> None:
    """Do the `steps` (staging.py) over the storages' byte `views`, the arena tensor `host`, `_staging`."""
    pending: dict[int, list[Any]] = {}
    try:
        for step in steps:
            batch = plan.batches[step.batch]
            buf = _staging[step.buffer]
            if step.kind in (D2H, H2D):
                events = []
                for device, pieces in itertools.groupby(batch.pieces, key=lambda p: views[p.item].device.index):
                    with torch.cuda.stream(streams[device]):
                        for p in pieces:
                            gpu = views[p.item][p.offset:p.offset + p.length]
                            pinned = buf[p.at:p.at + p.length]
                            if step.kind == D2H:
                                pinned.copy_(gpu, non_blocking=True)
                            else:
                                gpu.copy_(pinned, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(streams[device])
                    events.append(event)
                pending[step.batch] = events
            elif step.kind == WAIT:
                for event in pending.pop(step.batch):
                    event.synchronize()
            elif step.kind == DRAIN:
                host[batch.start:batch.start + batch.length].copy_(buf[:batch.length])
            elif step.kind == FILL:
                buf[:batch.length].copy_(host[batch.start:batch.start + batch.length])
            else:
                raise ValueError(f"unknown copy step {step.kind!r}")
    except BaseException:  # half-way: let the GPU's copies finish before the buffers are touched again
        for stream in streams.values():
            stream.synchronize()
        raise


def _took(nbytes: int, seconds: float) -> float:
    return round(nbytes / GiB / seconds, 2) if seconds > 0 else 0.0


def offload(buffers: int = DEFAULT_BUFFERS, buffer_bytes: int = DEFAULT_BUFFER_BYTES,
            huge_pages: bool = True) -> dict[str, Any]:
    """Copy every CUDA storage to host memory through `buffers` pinned staging buffers of `buffer_bytes`
    and free it on the GPU. Returns what it moved: `bytes`, `seconds` (the whole call), `storages`, and
    `gib_s`, `copy_seconds` (the copies alone), `batches`, `staging_bytes`, `staging_seconds` (allocating
    the staging buffers: the first offload only), `threads` (torch's CPU threads for the copies) and
    `left_in_place` (storages that cannot be resized, left to the driver's checkpoint)."""
    check_staging(buffers, buffer_bytes)
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {"bytes": 0, "seconds": 0.0, "storages": 0}
    started = time.perf_counter()
    storages, fixed, graphs = _scan(torch)
    if graphs:
        return {"bytes": 0, "seconds": 0.0, "storages": 0, "skipped": "the kernel holds CUDA graphs"}
    if not storages:
        return {"bytes": 0, "seconds": time.perf_counter() - started, "storages": 0, "left_in_place": fixed}
    devices = sorted({s.device.index for s in storages})
    for d in devices:  # every stream's work on these tensors is done before the side streams read them
        torch.cuda.synchronize(d)
    staging_s = _staging_buffers(torch, buffers, buffer_bytes)
    plan = layout([s.nbytes() for s in storages], buffer_bytes)
    parked = _Parked(storages, plan, buffers, *_arena(torch, plan.size, huge_pages))
    copy_started = time.perf_counter()
    try:
        views = [_bytes_of(torch, s) for s in storages]
        with _all_threads(torch) as threads:
            _carry_out(torch, offload_steps(len(plan.batches), buffers), plan=plan, views=views, host=parked.host,
                       streams=_side_streams(torch, devices))
        del views
    except BaseException:  # nothing was freed on the GPU: the kernel goes on as it was
        parked.close()
        raise
    copy_s = time.perf_counter() - copy_started
    _offloaded.append(parked)  # first: should a resize fail, `reload` still puts every storage back
    for storage in storages:
        storage.resize_(0)
    del storages, parked
    gc.collect()
    torch.cuda.empty_cache()
    seconds = time.perf_counter() - started
    return {"bytes": plan.nbytes, "seconds": seconds, "storages": len(plan.sizes),
            "gib_s": _took(plan.nbytes, seconds), "copy_seconds": copy_s, "batches": len(plan.batches),
            "staging_bytes": buffers * buffer_bytes, "staging_seconds": staging_s, "threads": threads,
            "left_in_place": fixed}


def reload() -> dict[str, Any]:
    """Grow every offloaded storage back on its GPU and refill it from host memory. Returns `bytes`,
    `seconds`, `storages`, `gib_s`, `batches`."""
    if not _offloaded:
        return {"bytes": 0, "seconds": 0.0}
    torch = _torch()
    started = time.perf_counter()
    moved = storages = batches = 0
    for parked in list(_offloaded):
        plan, buffers = parked.plan, parked.buffers
        _staging_buffers(torch, buffers, plan.buffer_bytes)  # still there since the offload: no time spent
        devices = sorted({s.device.index for s in parked.storages})
        for storage, nbytes in zip(parked.storages, plan.sizes, strict=True):
            storage.resize_(nbytes)
        for d in devices:
            torch.cuda.synchronize(d)
        views = [_bytes_of(torch, s) for s in parked.storages]
        with _all_threads(torch):
            _carry_out(torch, reload_steps(len(plan.batches), buffers), plan=plan, views=views, host=parked.host,
                       streams=_side_streams(torch, devices))
        del views
        _offloaded.remove(parked)  # only now: a reload that failed half-way can be tried again
        moved, storages, batches = moved + plan.nbytes, storages + len(plan.sizes), batches + len(plan.batches)
        parked.storages = []  # the kernel's again: not kept alive by the copy waiting for `release`
        _spent.append(parked)
    seconds = time.perf_counter() - started
    return {"bytes": moved, "seconds": seconds, "storages": storages, "gib_s": _took(moved, seconds),
            "batches": batches}


def release() -> dict[str, Any]:
    """Free the host copies `reload` put back (run after the waiting cells: they need not wait for it).
    The staging buffers stay for the next suspend: `staging_bytes` says how much pinned memory they hold."""
    torch = sys.modules.get("torch")
    started = time.perf_counter()
    freed = sum(p.plan.nbytes for p in _spent)
    for parked in _spent:
        parked.close()
    _spent.clear()
    if torch is not None:
        # torch caches freed pinned blocks; give them back, or they count against the kernel's memory limit.
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    return {"bytes": freed, "seconds": time.perf_counter() - started,
            "staging_bytes": sum(int(b.numel()) for b in _staging)}


ACTIONS = {"offload": offload, "reload": reload, "release": release}


def run(action: str, **options: Any) -> None:
    """What the backend runs in the kernel: prints one JSON line with the result."""
    if action not in ACTIONS:
        raise ValueError(f"unknown GPU offload action {action!r}: use one of {', '.join(ACTIONS)}")
    print(json.dumps(ACTIONS[action](**options)))
