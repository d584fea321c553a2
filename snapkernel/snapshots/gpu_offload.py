"""Runs inside a kernel: moves its torch CUDA tensors to pinned host memory and back, in place.

The fast path of GPU hibernation. The driver's checkpoint moves GPU memory at about 2 GiB/s; a copy
into pinned host memory runs at the PCIe bandwidth (about 50 GiB/s on an H100). So before the driver
checkpoint, each CUDA storage is copied out and shrunk to nothing (`resize_(0)`, as FSDP frees
parameters), which leaves the driver only the context and caches to move; on waking each storage is
grown back and refilled. Storages keep their identity, so every tensor and view over them stays valid.
Raw pointers captured elsewhere would go stale: when the kernel holds CUDA graphs, `offload` leaves
everything in place and the driver moves it all. (Other libraries' zero-copy views of torch memory, e.g.
through DLPack, are not detected; `SandboxManager`'s `gpu_offload` setting turns this path off.)
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

_offloaded: list[tuple[Any, Any]] = []  # (storage, pinned host copy)
_spent: list[Any] = []  # pinned copies already put back, freed by `release` (unpinning GiBs takes seconds)


def _cuda_storages(torch: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            storage = obj.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen[storage.data_ptr()] = storage
    return list(seen.values())


def offload() -> dict[str, Any]:
    """Copy every CUDA storage to pinned host memory and free it on the GPU. Returns what it moved."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {"bytes": 0, "seconds": 0.0, "storages": 0}
    if any(isinstance(obj, torch.cuda.CUDAGraph) for obj in gc.get_objects()):
        return {"bytes": 0, "seconds": 0.0, "storages": 0, "skipped": "the kernel holds CUDA graphs"}
    started = time.perf_counter()
    torch.cuda.synchronize()
    storages = _cuda_storages(torch)
    pairs = []
    for storage in storages:
        view = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True)
        host.copy_(view, non_blocking=True)
        pairs.append((storage, host))
    torch.cuda.synchronize()
    for storage, _ in pairs:
        storage.resize_(0)
    _offloaded.extend(pairs)
    del storages, pairs
    gc.collect()
    torch.cuda.empty_cache()
    moved = sum(int(h.numel()) for _, h in _offloaded)
    return {"bytes": moved, "seconds": time.perf_counter() - started, "storages": len(_offloaded)}


def reload() -> dict[str, Any]:
    """Grow every offloaded storage back on its GPU and refill it from host memory."""
    if not _offloaded:
        return {"bytes": 0, "seconds": 0.0}
    import torch

    started = time.perf_counter()
    moved = 0
    for storage, host in _offloaded:
        storage.resize_(host.numel())
        torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).copy_(host, non_blocking=True)
        moved += int(host.numel())
    torch.cuda.synchronize()
    _spent.extend(h for _, h in _offloaded)
    _offloaded.clear()
    return {"bytes": moved, "seconds": time.perf_counter() - started}


def release() -> dict[str, Any]:
    """Free the pinned copies `reload` put back (run after the waiting cells: it is slow, they are not)."""
    torch = sys.modules.get("torch")
    started = time.perf_counter()
    freed = sum(int(h.numel()) for h in _spent)
    _spent.clear()
    if torch is not None:
        # torch caches freed pinned blocks; give them back, or they count against the kernel's memory limit.
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    return {"bytes": freed, "seconds": time.perf_counter() - started}


def run(action: str) -> None:
    """What the backend runs in the kernel: prints one JSON line with the result."""
    print(json.dumps({"offload": offload, "reload": reload, "release": release}[action]()))
