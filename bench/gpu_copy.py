"""GPU memory out at copy speed: the offload's capture bandwidth beside a plain pinned copy, in one process.

Needs torch with CUDA, and none of snapkernel's other dependencies (it runs where only torch is installed;
bench/hibernate.py also runs it inside a GPU kernel). It measures, on the first GPU:
- pinned device→host and host→device copy bandwidth (one 4 GiB pinned buffer, best of three);
- `gpu_offload` (pinned staging buffers into pageable host memory): offload and reload GiB/s of `--gib` GiB
  held in tensors of mixed sizes, the first time (the staging buffers are allocated then), again, and
  again with 4 KiB pages instead of huge pages;
- the way before it (a pinned host copy allocated per storage), unless `--no-before`;
- each against the pinned copy. Target: offload at least 0.5 times pinned device→host.
Every run checks that the tensors come back bit-identical (a checksum per tensor and a sample of its bytes).
Prints a table and writes JSON (default bench/results/gpu_copy.json).

    python bench/gpu_copy.py [--gib 16] [--buffers 4] [--buffer-mib 64] [--no-before]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

GiB = 1024**3
TARGET = 0.5  # offload GiB/s at least this times pinned device→host


def _sizes(gib: float) -> list[int]:
    """float32 element counts adding up to about `gib` GiB: 3/4 in tensors of 256 MiB to 1 GiB, the rest in
    tensors of 1 to 64 MiB, and 500 small ones (a model's biases and norms), none a multiple of a buffer."""
    import random

    rng = random.Random(14)
    total = int(gib * GiB) // 4
    out: list[int] = [rng.randrange(1, 4096) for _ in range(500)]
    big = total * 3 // 4
    while sum(out) < big:
        out.append(min(rng.randrange(64 << 20, 256 << 20) + 3, big - sum(out) + 1))
    while sum(out) < total:
        out.append(min(rng.randrange(256 << 10, 16 << 20) + 1, total - sum(out) + 1))
    return out


def _pinned_copy(torch: Any, gib: int = 4) -> tuple[float, float]:
    x = torch.empty(gib << 28, device="cuda").uniform_()
    pinned = torch.empty(x.shape, pin_memory=True)
    pinned.copy_(x)
    torch.cuda.synchronize()
    d2h = h2d = 0.0
    for _ in range(3):
        t = time.perf_counter()
        pinned.copy_(x, non_blocking=True)
        torch.cuda.synchronize()
        d2h = max(d2h, gib / (time.perf_counter() - t))
        t = time.perf_counter()
        x.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        h2d = max(h2d, gib / (time.perf_counter() - t))
    del x, pinned
    torch.cuda.empty_cache()
    getattr(torch._C, "_host_emptyCache", lambda: None)()
    return d2h, h2d


def _fingerprint(torch: Any, tensors: list[Any]) -> list[tuple[int, Any]]:
    return [(int(t.view(torch.int32).sum(dtype=torch.int64)), t[::4099].clone()) for t in tensors]


def _same(torch: Any, tensors: list[Any], prints: list[tuple[int, Any]]) -> bool:
    return all(int(t.view(torch.int32).sum(dtype=torch.int64)) == s and torch.equal(t[::4099], sample)
               for t, (s, sample) in zip(tensors, prints, strict=True))


# The way before the staging buffers (gpu_offload.py until issue 14 part 5), kept here to compare with.
def _before_offload(torch: Any) -> tuple[list[tuple[Any, Any]], float]:
    import gc

    started = time.perf_counter()
    torch.cuda.synchronize()
    seen: dict[int, Any] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            s = obj.untyped_storage()
            if s.nbytes() and s.data_ptr() not in seen:
                seen[s.data_ptr()] = s
    pairs = []
    for storage in seen.values():
        view = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=True)
        host.copy_(view, non_blocking=True)
        pairs.append((storage, host))
    torch.cuda.synchronize()
    for storage, _ in pairs:
        storage.resize_(0)
    gc.collect()
    torch.cuda.empty_cache()
    return pairs, time.perf_counter() - started


def _before_reload(torch: Any, pairs: list[tuple[Any, Any]]) -> float:
    started = time.perf_counter()
    for storage, host in pairs:
        storage.resize_(host.numel())
        torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage).copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - started


def measure(gib: float = 16.0, buffers: int = 4, buffer_mib: int = 64, before: bool = True) -> dict[str, Any]:
    """Everything the table shows, as a dict (bench/hibernate.py calls this inside a kernel)."""
    import torch

    from snapkernel.snapshots import gpu_offload

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    torch.cuda.init()
    d2h, h2d = _pinned_copy(torch)
    result: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cores": len(os.sched_getaffinity(0)), "gib": gib, "d2h_pinned_gib_s": round(d2h, 2),
        "h2d_pinned_gib_s": round(h2d, 2), "runs": [],
    }
    tensors = [torch.empty(n, device="cuda").uniform_() for n in _sizes(gib)]
    nbytes = sum(t.untyped_storage().nbytes() for t in tensors)
    prints = _fingerprint(torch, tensors)
    torch.cuda.synchronize()
    staging = f"staging {buffers}x{buffer_mib} MiB"
    for name, huge in ((f"{staging}, first", True), (f"{staging}, again", True), (f"{staging}, 4 KiB pages", False)):
        out = gpu_offload.offload(buffers=buffers, buffer_bytes=buffer_mib << 20, huge_pages=huge)
        back = gpu_offload.reload()
        ok = _same(torch, tensors, prints)
        freed = gpu_offload.release()
        result["runs"].append({
            "way": name, "bytes": out["bytes"], "offload_s": out["seconds"], "reload_s": back["seconds"],
            "release_s": freed["seconds"], "storages": out["storages"], "batches": out["batches"],
            "copy_s": out["copy_seconds"], "staging_s": out["staging_seconds"], "copy_threads": out["threads"],
            "ok": ok})
    if before:
        pairs, out_s = _before_offload(torch)
        back_s = _before_reload(torch, pairs)
        ok = _same(torch, tensors, prints)
        t = time.perf_counter()
        del pairs
        getattr(torch._C, "_host_emptyCache", lambda: None)()
        result["runs"].append({"way": "pinned copy per storage (before)", "bytes": nbytes, "offload_s": out_s,
                               "reload_s": back_s, "release_s": time.perf_counter() - t, "ok": ok})
    for r in result["runs"]:
        r["offload_gib_s"] = round(r["bytes"] / GiB / r["offload_s"], 2)
        r["reload_gib_s"] = round(r["bytes"] / GiB / r["reload_s"], 2)
        r["offload_vs_d2h"] = round(r["offload_gib_s"] / d2h, 3)
        r["reload_vs_h2d"] = round(r["reload_gib_s"] / h2d, 3)
    again = result["runs"][1]
    result["target_met"] = bool(again["ok"] and again["offload_vs_d2h"] >= TARGET)
    del tensors
    torch.cuda.empty_cache()
    return result


def table(result: dict[str, Any]) -> str:
    lines = [f"pinned copy, one 4 GiB buffer: device→host {result['d2h_pinned_gib_s']:.1f} GiB/s, host→device "
             f"{result['h2d_pinned_gib_s']:.1f} GiB/s ({result['gpu']}, torch {result['torch']}, "
             f"{result['cores']} cores)"]
    header = (f"{'way':<34} {'GiB':>5} {'offload s':>9} {'GiB/s':>6} {'/D2H':>5} {'reload s':>8} {'GiB/s':>6} "
              f"{'/H2D':>5} {'release s':>9} {'ok':>3}")
    lines += [header, "-" * len(header)]
    for r in result["runs"]:
        lines.append(f"{r['way']:<34} {r['bytes'] / GiB:>5.1f} {r['offload_s']:>9.2f} {r['offload_gib_s']:>6.1f} "
                     f"{r['offload_vs_d2h']:>5.2f} {r['reload_s']:>8.2f} {r['reload_gib_s']:>6.1f} "
                     f"{r['reload_vs_h2d']:>5.2f} {r['release_s']:>9.2f} {'yes' if r['ok'] else 'NO':>3}")
    again = result["runs"][1]
    lines.append(f"target: offload ≥ {TARGET} of device→host ({TARGET * result['d2h_pinned_gib_s']:.1f} GiB/s): "
                 f"{'met' if result['target_met'] else 'NOT met'} by '{again['way']}' "
                 f"({again['offload_vs_d2h']:.2f} of it; copies {again['copy_s']:.2f} s of {again['offload_s']:.2f} s, "
                 f"{again['copy_threads']} CPU threads, {again['storages']} storages in {again['batches']} batches)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--gib", type=float, default=16.0, help="GiB of tensors to move (default 16)")
    parser.add_argument("--buffers", type=int, default=4, help="staging buffers (default 4)")
    parser.add_argument("--buffer-mib", type=int, default=64, help="MiB per staging buffer (default 64)")
    parser.add_argument("--no-before", action="store_true", help="skip the way before (a pinned copy per storage)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_copy.json")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # snapkernel from this checkout
    result = measure(args.gib, args.buffers, args.buffer_mib, before=not args.no_before)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
