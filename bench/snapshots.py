"""Memory snapshots of gvisor kernels: snapshot and resume time and GiB/s by kernel size, beside the disk.

For kernels holding 64 MiB and 1 GiB of data (`--sizes`, in MiB; 4096 for the issue's largest), in one run:
- snapshot: `CreateSnapshot` of the live kernel (runsc checkpoint --leave-running, workspace copy, sha256
  of every file, fsync), in seconds and GiB/s of snapshot written;
- resume: from starting a kernel with `restore_from` until it answers a cell that reads its data back;
- the disk's own direct-I/O write and read bandwidth (dd oflag=direct / iflag=direct) in the same run.
Prints a table and writes JSON (default bench/results/snapshots.json). Needs runsc (`make install` as root).

    .venv/bin/python bench/snapshots.py [--sizes 64 1024 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jupyter_client.manager import KernelManager
from kernel_latency import Backend

from snapkernel.backend.client import BackendClient
from snapkernel.kernel_provisioner.kernelspec import install, kernel_json

GiB = 1024**3


def dd_bandwidth(directory: Path, mib: int) -> tuple[float, float]:
    """(write, read) GiB/s of `dd` with direct I/O on the disk that holds `directory`."""
    path = directory / "dd.bin"
    t = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={mib // 4}", "oflag=direct"],
                   check=True, capture_output=True)
    write = mib / 1024 / (time.perf_counter() - t)
    t = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], check=True, capture_output=True)
    read = mib / 1024 / (time.perf_counter() - t)
    path.unlink()
    return write, read


def run_cell(kc: Any, code: str) -> str:
    out: list[str] = []
    reply = kc.execute_interactive(code, timeout=600, output_hook=lambda m: out.append(
        m["content"].get("data", {}).get("text/plain", "") if m["msg_type"] == "execute_result" else ""))
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content']}")
    return "".join(out)


def measure(size_mib: int, specs: Path) -> dict[str, Any]:
    km = KernelManager(kernel_name="snapkernel-python")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(120)
    run_cell(kc, f"import os, numpy\ndata = numpy.random.default_rng(0).integers(0, 255, {size_mib} * 2**20, "
                 "dtype=numpy.uint8)\nchecksum = int(data[::4096].sum())")
    checksum = run_cell(kc, "checksum")
    sandbox = run_cell(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")

    async def snapshot() -> Any:
        client = BackendClient()
        try:
            return await client.create_snapshot(sandbox)
        finally:
            await client.close()

    t = time.perf_counter()
    snap = asyncio.run(snapshot())
    snap_s = time.perf_counter() - t
    kc.stop_channels()
    km.shutdown_kernel(now=True)

    name = f"bench-resume-{size_mib}"
    spec_dir = specs / "kernels" / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(name, {"restore_from": snap.id, "memory": "8Gi"})))
    t = time.perf_counter()
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(300)
    restored = run_cell(kc, "int(data[::4096].sum())")
    resume_s = time.perf_counter() - t
    kc.stop_channels()
    km.shutdown_kernel(now=True)
    if restored != checksum:
        raise RuntimeError(f"resumed kernel's data differs: {restored} != {checksum}")
    return {"size_mib": size_mib, "snapshot_bytes": int(snap.size), "snapshot_s": snap_s,
            "snapshot_gib_s": int(snap.size) / GiB / snap_s, "resume_s": resume_s,
            "resume_gib_s": int(snap.size) / GiB / resume_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024], help="kernel data sizes in MiB")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "snapshots.json")
    args = parser.parse_args()
    if not shutil.which("runsc"):
        print("runsc is not installed: `make install` as root installs it", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="snapkernel-bench-"))
    backend = Backend(tmp / "state", runtime="gvisor")
    (tmp / "state").mkdir()
    ok = False
    try:
        backend.start()
        install({}, prefix=str(tmp / "prefix"))
        specs = tmp / "prefix" / "share" / "jupyter"
        import os

        os.environ["JUPYTER_PATH"] = str(specs)
        disk_write, disk_read = dd_bandwidth(tmp, 1024)
        rows = [measure(size, specs) for size in args.sizes]
        ok = True
    finally:
        backend.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} (backend log: {tmp / 'state' / 'backend.log'})", file=sys.stderr)
    print(f"disk (dd, direct I/O): write {disk_write:.2f} GiB/s, read {disk_read:.2f} GiB/s\n")
    header = f"{'kernel data':>12} {'snapshot':>10} {'snapshot s':>11} {'GiB/s':>7} {'resume s':>9} {'GiB/s':>7}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['size_mib']:>8} MiB {r['snapshot_bytes'] / 2**20:>6.0f} MiB {r['snapshot_s']:>11.2f} "
              f"{r['snapshot_gib_s']:>7.2f} {r['resume_s']:>9.2f} {r['resume_gib_s']:>7.2f}")
    print("\nresume GiB/s against the disk's read bandwidth (target: at least half):")
    for r in rows:
        print(f"  {r['size_mib']} MiB: {r['resume_gib_s'] / disk_read:.2f} of the disk's read bandwidth")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"disk_write_gib_s": disk_write, "disk_read_gib_s": disk_read, "runs": rows},
                                   indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
