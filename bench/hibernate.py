"""Hibernation: how long an idle kernel takes to go to sleep, and to wake on the next cell.

In one run:
- a CPU kernel holding `--cpu-gib` GiB (default 1) on each runtime here (`process`: state snapshot;
  `gvisor`: runsc memory image): seconds to hibernate, and from sending the next cell to its output
  (target: at most 1.5 s to wake);
- on a machine with an NVIDIA GPU, in a GPU kernel: pinned device-to-host and host-to-device copy
  bandwidth, and the tensor offload's own capture bandwidth (bench/gpu_copy.py, `--capture-gib` GiB,
  default `--gpu-gib`: through the staging buffers, and the way before them, a pinned copy per storage)
  as a ratio to the pinned device-to-host copy (target: at least 0.5);
- then the suspend and resume GiB/s of each path (`pinned`: torch tensors through the staging buffers,
  then the driver's checkpoint for the rest; `driver`: the CUDA driver's checkpoint moves everything),
  end to end for a GPU kernel holding `--gpu-gib` GiB of GPU memory (default 16) and `--host-gib` GiB of
  host memory (default 4): from the first message to the output (target: at most 5 s), with the offload's
  GiB/s in the real path as the backend logged it.
Prints tables and writes JSON (default bench/results/hibernate.json).

    .venv/bin/python bench/hibernate.py [--cpu-gib 1] [--gpu-gib 16] [--host-gib 4] [--parts cpu gpu]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_copy
from kernel_latency import Backend
from snapshots import Kernel, kernelspec, run_cell

from snapkernel.client import BackendClient
from snapkernel.host.gpus import inventory
from snapkernel.kernel_provisioner.kernelspec import install

GiB = 1024**3
OFFLOADED = re.compile(r"offloaded (\d+) bytes of tensors in ([\d.]+)s \(([\d.]+) GiB/s")


def capture_in_kernel(gib: float, before: bool, specs: Path) -> dict[str, Any]:
    """bench/gpu_copy.py's measurements, run inside a GPU kernel (its source is sent as the cell)."""
    source = Path(gpu_copy.__file__).read_text()
    # The copies run on torch's CPU threads: a real offload gets every core (the backend lifts the kernel's CPU
    # quota), a cell only those of its spec, so this kernel asks for them.
    k = Kernel(kernelspec(specs, "bench-copy", {"gpu": "any:1", "runtime": "process",
                                                "cpu": min(16, os.cpu_count() or 1),
                                                "memory": f"{int(gib * 2) + 12}Gi"}))  # the copies, both ways
    try:
        cell = (f"_ns = {{'__name__': 'gpu_copy'}}\nexec({source!r}, _ns)\nimport json as _json\n"
                f"_json.dumps(_ns['measure'](gib={gib}, before={before}))")
        out: dict[str, Any] = json.loads(ast.literal_eval(run_cell(k.kc, cell, timeout=600)))
        return out
    finally:
        k.stop()


def call(method: str, sandbox: str) -> Any:
    async def go() -> Any:
        client = BackendClient()
        try:
            return await getattr(client, method)(sandbox)
        finally:
            await client.close()

    return asyncio.run(go())


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def sleep_and_wake(k: Kernel, check: str) -> dict[str, float]:
    """Hibernate the kernel now, then time the next cell from sending it to its output."""
    sandbox = run_cell(k.kc, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
    expected = run_cell(k.kc, check)
    say(f"hibernating {sandbox}")
    t = time.perf_counter()
    sb = call("hibernate_sandbox", sandbox)
    hibernate_s = time.perf_counter() - t
    say(f"hibernated by {sb.hibernation} in {hibernate_s:.2f}s; waking with a cell")
    t = time.perf_counter()
    got = run_cell(k.kc, check, timeout=90)
    wake_s = time.perf_counter() - t
    say(f"woke and answered in {wake_s:.2f}s")
    if got != expected:
        raise RuntimeError(f"the woken kernel's data differs: {got} != {expected}")
    return {"method": sb.hibernation, "hibernate_s": hibernate_s, "wake_to_output_s": wake_s}


def cpu_kernel(runtime: str, gib: float, specs: Path) -> dict[str, Any]:
    memory = f"{int(gib * 3) + 2}Gi"
    k = Kernel(kernelspec(specs, f"bench-hib-{runtime}", {"runtime": runtime, "memory": memory}))
    try:
        run_cell(k.kc, f"import numpy\ndata = numpy.random.default_rng(0).integers(0, 255, int({gib} * 2**30), "
                       "dtype=numpy.uint8)")
        return {"runtime": runtime, "gib": gib, **sleep_and_wake(k, "int(data[::4096].sum())")}
    finally:
        k.stop()


def gpu_kernel(path: str, gpu_gib: float, host_gib: float, specs: Path, state_dir: Path) -> dict[str, Any]:
    k = Kernel(kernelspec(specs, f"bench-hib-gpu-{path}", {"gpu": "any:1", "runtime": "process",
                                                          "memory": f"{int(host_gib * 2) + 8}Gi"}))
    try:
        run_cell(k.kc, f"import torch, numpy\nw = torch.randn(int({gpu_gib} * 2**28), device='cuda')\n"
                       f"host = numpy.ones(int({host_gib} * 2**27))\ntorch.cuda.synchronize()")
        out = sleep_and_wake(k, "(float(w[::65536].double().sum()), float(host[::4096].sum()))")
        out.update(path=path, gpu_gib=gpu_gib, host_gib=host_gib, suspend_gib_s=gpu_gib / out["hibernate_s"],
                   resume_gib_s=gpu_gib / out["wake_to_output_s"])
        logged = OFFLOADED.findall((state_dir / "backend.log").read_text(errors="replace"))
        if logged:  # the offload inside the suspend, as the backend logged it
            nbytes, seconds, gib_s = logged[-1]
            out.update(offload_bytes=int(nbytes), offload_s=float(seconds), offload_gib_s=float(gib_s))
        return out
    except Exception:
        for log in state_dir.glob("sandboxes/*/sandbox.log"):
            say(f"{log}:\n{log.read_text()[-2000:]}")
        raise
    finally:
        k.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--cpu-gib", type=float, default=1.0)
    parser.add_argument("--gpu-gib", type=float, default=16.0)
    parser.add_argument("--host-gib", type=float, default=4.0)
    parser.add_argument("--paths", nargs="+", choices=["pinned", "driver"], default=["pinned", "driver"])
    parser.add_argument("--parts", nargs="+", choices=["cpu", "gpu"], default=["cpu", "gpu"])
    parser.add_argument("--capture-gib", type=float, default=None,
                        help="GiB of tensors for the capture bandwidth (default: --gpu-gib)")
    parser.add_argument("--no-before", action="store_true",
                        help="capture: skip the way before the staging buffers (a pinned copy per storage)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hibernate.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="snapkernel-bench-hib-"))
    install({}, prefix=str(tmp / "prefix"))
    specs = tmp / "prefix" / "share" / "jupyter"
    os.environ["JUPYTER_PATH"] = str(specs)
    runtimes = ["process", *(["gvisor"] if shutil.which("runsc") else [])] if "cpu" in args.parts else []
    gpus = inventory()[0] if "gpu" in args.parts else []
    result: dict[str, Any] = {"cpu": [], "gpu": [], "copy": None, "capture": None}
    for runtime in runtimes:
        backend = Backend(tmp / f"state-{runtime}", runtime=runtime)
        backend.state_dir.mkdir()
        try:
            backend.start()
            result["cpu"].append(cpu_kernel(runtime, args.cpu_gib, specs))
        finally:
            backend.stop()
    if gpus:
        for path, extra in (("pinned", ()), ("driver", ("--BackendApp.gpu_offload=False",))):
            if path not in args.paths:
                continue
            backend = Backend(tmp / f"state-gpu-{path}", runtime="process", extra=extra)
            backend.state_dir.mkdir()
            try:
                backend.start()
                if result["capture"] is None:
                    say("copy bandwidth and the offload's capture bandwidth, in a GPU kernel")
                    capture = capture_in_kernel(args.capture_gib or args.gpu_gib, not args.no_before, specs)
                    result["capture"] = capture
                    result["copy"] = {k: capture[k] for k in ("d2h_pinned_gib_s", "h2d_pinned_gib_s")}
                result["gpu"].append(gpu_kernel(path, args.gpu_gib, args.host_gib, specs, backend.state_dir))
            except Exception:
                say(f"failed; backend log:\n{backend.log_path.read_text()[-4000:]}")
                raise
            finally:
                backend.stop()
    shutil.rmtree(tmp, ignore_errors=True)

    header = f"{'runtime':>8} {'method':>7} {'data':>8} {'hibernate s':>12} {'wake→output s':>14} {'target':>7}"
    print(header + "\n" + "-" * len(header))
    for r in result["cpu"]:
        print(f"{r['runtime']:>8} {r['method']:>7} {r['gib']:>4g} GiB {r['hibernate_s']:>12.2f} "
              f"{r['wake_to_output_s']:>14.2f} {'≤ 1.5':>7}")
    if not gpus:
        print("\nGPU: skipped (no NVIDIA GPU here)")
    else:
        print("\n" + gpu_copy.table(result["capture"]))
        d2h = result["copy"]["d2h_pinned_gib_s"]
        header = (f"{'path':>7} {'GPU':>7} {'host':>6} {'suspend s':>10} {'GiB/s':>7} {'first msg→output s':>19} "
                  f"{'GiB/s':>7} {'target':>7} {'offload GiB/s':>14} {'/D2H':>5}")
        print("\n" + header + "\n" + "-" * len(header))
        for r in result["gpu"]:
            offload = (f"{r['offload_gib_s']:>14.1f} {r['offload_gib_s'] / d2h:>5.2f}" if "offload_gib_s" in r
                       else f"{'-':>14} {'-':>5}")
            print(f"{r['path']:>7} {r['gpu_gib']:>3g} GiB {r['host_gib']:>2g} GiB {r['hibernate_s']:>10.2f} "
                  f"{r['suspend_gib_s']:>7.2f} {r['wake_to_output_s']:>19.2f} {r['resume_gib_s']:>7.2f} {'≤ 5':>7} "
                  f"{offload}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
