"""Snapshots of gvisor kernels: snapshot and resume time and GiB/s by kernel size and kind, beside the disk,
and resuming a notebook from a snapshot against re-running it.

In one run:
- for kernels holding `--sizes` MiB of data (default 64 and 1024; add 4096 for the issue's largest), both
  kinds: `memory` (runsc checkpoint --leave-running, workspace copy, sha256 of every file, fsync) and
  `state` (the namespace as raw buffers); snapshot seconds and GiB/s, and resume: from starting a kernel
  with `restore_from` until it answers a cell that reads its data back;
- the disk's own direct-I/O write and read bandwidth (dd oflag=direct / iflag=direct);
- a notebook that imports pandas, scipy and scikit-learn and fits a model on generated data: re-running
  it in a fresh kernel against resuming it from a memory snapshot (needs `pip install -e .[bench]`).
Prints tables and writes JSON (default bench/results/snapshots.json). Needs runsc (`make install` as root).

    .venv/bin/python bench/snapshots.py [--sizes 64 1024 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jupyter_client.manager import KernelManager
from kernel_latency import Backend

from snapkernel.client import BackendClient
from snapkernel.kernel_provisioner.kernelspec import install, kernel_json

GiB = 1024**3
NOTEBOOK = [
    "import numpy as np, pandas as pd, scipy.stats as st\n"
    "from sklearn.ensemble import RandomForestClassifier\nfrom sklearn.model_selection import train_test_split",
    "rng = np.random.default_rng(0)\nX = pd.DataFrame(rng.normal(size=(20000, 20))).add_prefix('f')\n"
    "y = (X.sum(axis=1) + rng.normal(size=len(X)) > 0).astype(int)\nX['z'] = st.zscore(X['f0'])",
    "X_tr, X_te, y_tr, y_te = train_test_split(X, y, random_state=0)\n"
    "model = RandomForestClassifier(n_estimators=100, random_state=0).fit(X_tr, y_tr)",
    "score = round(model.score(X_te, y_te), 4)",
]


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


def run_cell(kc: Any, code: str, timeout: float = 300) -> str:
    out: list[str] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda m: out.append(
        m["content"].get("data", {}).get("text/plain", "") if m["msg_type"] == "execute_result" else ""))
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content'].get('ename')}: {reply['content'].get('evalue')}")
    return "".join(out)


class Kernel:
    def __init__(self, name: str) -> None:
        self.km = KernelManager(kernel_name=name)
        self.km.start_kernel()
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(300)

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def kernelspec(specs: Path, name: str, config: dict[str, Any]) -> str:
    spec_dir = specs / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps(kernel_json(name, config)))
    return name


def snapshot(sandbox: str, kind: str) -> Any:
    async def go() -> Any:
        client = BackendClient()
        try:
            return await client.create_snapshot(sandbox, kind)
        finally:
            await client.close()

    return asyncio.run(go())


def measure(size_mib: int, kind: str, specs: Path) -> dict[str, Any]:
    memory = f"{max(4, size_mib * 3 // 1024 + 2)}Gi"
    k = Kernel(kernelspec(specs, f"bench-{size_mib}", {"memory": memory}))
    run_cell(k.kc, f"import os, numpy\ndata = numpy.random.default_rng(0).integers(0, 255, {size_mib} * 2**20, "
                   "dtype=numpy.uint8)\nchecksum = int(data[::4096].sum())")
    checksum = run_cell(k.kc, "checksum")
    sandbox = run_cell(k.kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
    t = time.perf_counter()
    snap = snapshot(sandbox, kind)
    snap_s = time.perf_counter() - t
    k.stop()
    t = time.perf_counter()
    k = Kernel(kernelspec(specs, f"bench-resume-{size_mib}-{kind}", {"restore_from": snap.id, "memory": memory}))
    restored = run_cell(k.kc, "int(data[::4096].sum())")
    resume_s = time.perf_counter() - t
    k.stop()
    if restored != checksum:
        raise RuntimeError(f"resumed kernel's data differs: {restored} != {checksum}")
    return {"size_mib": size_mib, "kind": kind, "snapshot_bytes": int(snap.size), "snapshot_s": snap_s,
            "snapshot_gib_s": int(snap.size) / GiB / snap_s, "resume_s": resume_s,
            "resume_gib_s": int(snap.size) / GiB / resume_s}


def notebook(specs: Path) -> dict[str, Any]:
    """Re-running the notebook in a fresh kernel against resuming it from a memory snapshot."""
    t = time.perf_counter()
    k = Kernel("snapkernel-python")
    for cell in NOTEBOOK:
        run_cell(k.kc, cell)
    score = run_cell(k.kc, "score")
    rerun_s = time.perf_counter() - t
    sandbox = run_cell(k.kc, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
    snap = snapshot(sandbox, "memory")
    k.stop()
    t = time.perf_counter()
    k = Kernel(kernelspec(specs, "bench-notebook-resume", {"restore_from": snap.id}))
    resumed = run_cell(k.kc, "score")
    resume_s = time.perf_counter() - t
    k.stop()
    if resumed != score:
        raise RuntimeError(f"resumed notebook differs: {resumed} != {score}")
    return {"rerun_s": rerun_s, "resume_s": resume_s, "speedup": rerun_s / resume_s, "score": score}


@contextlib.contextmanager
def gvisor_backend(prefix: str, extra: tuple[str, ...] = ()) -> Iterator[tuple[Path, Path]]:
    """A gvisor backend in a temporary dir with the kernelspecs installed first on JUPYTER_PATH; yields (that dir,
    the kernelspecs' dir). The dir goes afterwards, or is kept, and named, when the bench failed."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    (tmp / "state").mkdir()
    backend = Backend(tmp / "state", runtime="gvisor", extra=extra)
    ok = False
    try:
        backend.start()
        install({}, prefix=str(tmp / "prefix"))
        specs = tmp / "prefix" / "share" / "jupyter"
        os.environ["JUPYTER_PATH"] = str(specs)
        yield tmp, specs
        ok = True
    finally:
        backend.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} (backend log: {tmp / 'state' / 'backend.log'})", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 1024], help="kernel data sizes in MiB")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "snapshots.json")
    args = parser.parse_args()
    if not shutil.which("runsc"):
        print("runsc is not installed: `make install` as root installs it", file=sys.stderr)
        return 2
    nb: dict[str, Any] | None = None
    with gvisor_backend("snapkernel-bench-") as (tmp, specs):
        disk_write, disk_read = dd_bandwidth(tmp, 1024)
        rows = [measure(size, kind, specs) for size in args.sizes for kind in ("memory", "state")]
        if all(importlib.util.find_spec(m) for m in ("pandas", "scipy", "sklearn")):
            nb = notebook(specs)
    print(f"disk (dd, direct I/O): write {disk_write:.2f} GiB/s, read {disk_read:.2f} GiB/s\n")
    header = (f"{'kernel data':>12} {'kind':>7} {'snapshot':>10} {'snapshot s':>11} {'GiB/s':>7} {'resume s':>9} "
              f"{'GiB/s':>7} {'resume/disk read':>17}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['size_mib']:>8} MiB {r['kind']:>7} {r['snapshot_bytes'] / 2**20:>6.0f} MiB {r['snapshot_s']:>11.2f} "
              f"{r['snapshot_gib_s']:>7.2f} {r['resume_s']:>9.2f} {r['resume_gib_s']:>7.2f} "
              f"{r['resume_gib_s'] / disk_read:>17.2f}")
    print("(target: resume at least half the disk's read bandwidth)")
    if nb is None:
        print("\nnotebook resume vs re-run: skipped (pip install -e .[bench] for pandas, scipy, scikit-learn)")
    else:
        print(f"\nnotebook (pandas, scipy, scikit-learn fit): re-run {nb['rerun_s']:.2f} s, resume from a memory "
              f"snapshot {nb['resume_s']:.2f} s: {nb['speedup']:.1f}x faster (target: at least 10x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"disk_write_gib_s": disk_write, "disk_read_gib_s": disk_read, "runs": rows,
                                    "notebook": nb}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
