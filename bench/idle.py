"""Idle cost: the CPU an idle snapkernel kernel uses, against an idle local ipykernel.

For each kind (a local ipykernel, then snapkernel kernels of each runtime: `process`, and `gvisor` where
runsc is installed, once per `--gvisor-platforms` entry) this starts `--kernels` kernels, runs one cell in
each, waits `--settle` seconds for start-up work to end, and then measures, over `--seconds` seconds, the
user+system CPU seconds (utime+stime in /proc/PID/stat, threads included) of every process that belongs
to each kernel:

- snapkernel kernels: the sandbox's shim and all its descendants (the agent and ipykernel under the
  `process` runtime; `runsc`, its gofer, the Sentry and its stub processes under `gvisor`), plus the
  backend daemon's share (its own CPU over the same window divided by the number of kernels);
- local ipykernels: the kernel process and its descendants.

Every snapkernel kind gets a backend of its own (`snapkernel backend --runtime R` on a unix socket in a
temporary state dir, `--BackendApp.platform=P` for a gvisor platform), so its CPU is theirs alone. The
clients stay connected (shell and iopub, no heartbeat channel, as Jupyter Server's are); this process's own
CPU over the window (the provisioner's relay and the clients) is reported as `client`, apart. Only the
processes of this benchmark are counted, so other load on the machine does not show up in the numbers
(beyond slowing them down).

Prints, per kind: CPU % of a core per kernel (sandbox + backend share), its parts, and the ratio to the
local ipykernel; the backend daemon's own CPU; and writes JSON (default `bench/results/idle.json`).

    .venv/bin/python bench/idle.py                                  # 3 kernels per kind, 30 s
    .venv/bin/python bench/idle.py --kernels 1 --seconds 10 --gvisor-platforms systrap ptrace

On a failure the kind's state dir (with `backend.log`) is kept and its path printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from kernel_latency import Backend, KernelKind, execute_rtt, install_kernelspecs

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "idle.json"
TARGET_PERCENT = 1.0  # the target: an idle kernel under 1% of a core
CLK_TCK = os.sysconf("SC_CLK_TCK")
SHIM = b"snapkernel.backend.shim"


@dataclass(frozen=True)
class IdleKind:
    label: str
    kernel: KernelKind
    runtime: str = ""  # "" for the local ipykernel
    platform: str = ""  # gvisor only; "" = the backend's default

    @property
    def baseline(self) -> bool:
        return self.kernel.baseline


# --- /proc ----------------------------------------------------------------------------------------
@dataclass
class Proc:
    pid: int
    ppid: int
    comm: str
    cpu_s: float  # utime + stime, all threads
    start: int  # starttime in ticks since boot: tells a reused pid apart


def read_procs() -> dict[int, Proc]:
    out: dict[int, Proc] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(name)] = Proc(int(name), int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / CLK_TCK,
                              int(fields[19]))
    return out


def descendants(procs: dict[int, Proc], root: int) -> list[int]:
    """`root` and every process below it (those still alive)."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out = [root] if root in procs else []
    i = 0
    while i < len(out):
        out += children.get(out[i], [])
        i += 1
    return out


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def shim_pid(procs: dict[int, Proc], sandbox_id: str) -> int:
    for pid in procs:
        cmd = cmdline(pid)
        if SHIM in cmd and b"\0--sandbox-id\0" + sandbox_id.encode() + b"\0" in cmd:
            return pid
    raise RuntimeError(f"no shim process found for sandbox {sandbox_id}")


def cpu_delta(before: dict[int, Proc], after: dict[int, Proc], pids: list[int]) -> dict[int, float]:
    """CPU seconds each of `pids` (alive at the end) used between the two readings; one started in
    between counts from zero. A process that ended in between is not seen (an idle kernel has none)."""
    out = {}
    for pid in pids:
        b = before.get(pid)
        base = b.cpu_s if b is not None and b.start == after[pid].start else 0.0
        out[pid] = after[pid].cpu_s - base
    return out


def breakdown(after: dict[int, Proc], delta: dict[int, float]) -> dict[str, float]:
    """CPU seconds by process name (`comm`, with runsc's `exe` processes named by their role)."""
    out: dict[str, float] = {}
    for pid, seconds in delta.items():
        name = after[pid].comm
        cmd = cmdline(pid)
        if name in {"exe", "python"}:
            words = cmd.split(b"\0")
            if words and words[0].startswith(b"runsc-"):
                name = words[0].decode()
            elif name == "exe":
                name = "runsc stub" if not words[0] else words[0].decode()[:40]
            elif b"-m" in words:
                name = words[words.index(b"-m") + 1].decode()
        out[name] = out.get(name, 0.0) + seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --- one kind ---------------------------------------------------------------------------------------
@dataclass
class KindResult:
    kind: IdleKind
    kernels: int = 0
    seconds: float = 0.0
    kernel_cpu_s: list[float] = field(default_factory=list)  # per kernel: its own processes
    backend_cpu_s: float = 0.0
    client_cpu_s: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)  # CPU seconds by process name, all kernels
    error: str | None = None

    def per_kernel_percent(self) -> float:
        n = max(self.kernels, 1)
        return 100 * (sum(self.kernel_cpu_s) + self.backend_cpu_s) / n / self.seconds

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kernel": self.kind.label, "runtime": self.kind.runtime or "local",
                               "platform": self.kind.platform or None, "kernels": self.kernels,
                               "seconds": self.seconds, "error": self.error}
        if self.kernel_cpu_s and self.seconds:
            n = self.kernels
            out.update(
                cpu_percent_per_kernel=self.per_kernel_percent(),
                sandbox_percent_per_kernel=100 * sum(self.kernel_cpu_s) / n / self.seconds,
                backend_share_percent_per_kernel=100 * self.backend_cpu_s / n / self.seconds,
                backend_percent=100 * self.backend_cpu_s / self.seconds if self.kind.runtime else None,
                client_percent=100 * self.client_cpu_s / self.seconds,
                kernel_cpu_s=self.kernel_cpu_s, backend_cpu_s=self.backend_cpu_s,
                client_cpu_s=self.client_cpu_s,
                parts_percent_per_kernel={k: 100 * v / n / self.seconds for k, v in self.parts.items()},
            )
        return out


def kernel_root(km: KernelManager, procs: dict[int, Proc]) -> int:
    """The pid whose process tree is this kernel's: the shim of its sandbox, or the local kernel."""
    sandbox_id = getattr(km.provisioner, "sandbox_id", None)
    if sandbox_id:
        return shim_pid(procs, sandbox_id)
    pid = getattr(km.provisioner, "pid", None) or getattr(getattr(km.provisioner, "process", None), "pid", None)
    if not pid:
        raise RuntimeError(f"cannot tell the pid of kernel {km.kernel_id}")
    return int(pid)


def measure(kind: IdleKind, backend: Backend | None, args: argparse.Namespace) -> KindResult:
    kernels, seconds, settle, timeout = args.kernels, args.seconds, args.settle, args.timeout
    result = KindResult(kind)
    started: list[tuple[KernelManager, BlockingKernelClient]] = []
    try:
        for i in range(kernels):
            km = KernelManager(kernel_name=kind.kernel.kernel_name)
            km.start_kernel()
            kc = km.client()
            started.append((km, kc))
            kc.start_channels(hb=False)
            kc.wait_for_ready(timeout=timeout)
            execute_rtt(kc, "pass", timeout)  # a cell has run: what a kernel does first is done
            print(f"  {kind.label}: kernel {i + 1}/{kernels} ready", flush=True)
        print(f"  {kind.label}: settling {settle:g} s, then measuring {seconds:g} s", flush=True)
        time.sleep(settle)
        procs = read_procs()
        roots = [kernel_root(km, procs) for km, _ in started]
        me = os.getpid()
        t0 = time.monotonic()
        before = read_procs()
        time.sleep(seconds)
        after = read_procs()
        result.seconds = time.monotonic() - t0
        result.kernels = kernels
        owned: set[int] = set()
        for root in roots:
            pids = descendants(after, root)
            if not pids:
                raise RuntimeError(f"kernel process {root} ended during the measurement")
            owned.update(pids)
            delta = cpu_delta(before, after, pids)
            result.kernel_cpu_s.append(sum(delta.values()))
            for name, s in breakdown(after, delta).items():
                result.parts[name] = result.parts.get(name, 0.0) + s
        if backend is not None and backend.proc is not None:
            # the daemon and whatever it runs besides the sandboxes' shims (e.g. `runsc` queries)
            pids = [p for p in descendants(after, backend.proc.pid) if p not in owned]
            result.backend_cpu_s = sum(cpu_delta(before, after, pids).values())
        result.client_cpu_s = sum(cpu_delta(before, after, [me]).values())
        result.parts = dict(sorted(result.parts.items(), key=lambda kv: -kv[1]))
        print(f"  {kind.label}: {result.per_kernel_percent():.3f} % of a core per kernel", flush=True)
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        print(f"  {kind.label}: FAILED\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    finally:
        for km, kc in started:
            kc.stop_channels()
            try:
                if km.has_kernel:
                    km.shutdown_kernel(now=True)
                km.cleanup_resources()
            except Exception as e:  # one kernel that will not stop must not keep the others
                print(f"  {kind.label}: stopping a kernel: {e}", file=sys.stderr, flush=True)
    return result


def run_kind(kind: IdleKind, args: argparse.Namespace) -> KindResult:
    if not kind.runtime:
        return measure(kind, None, args)
    tmp = Path(tempfile.mkdtemp(prefix="snapkernel-bench-idle-"))
    extra = (f"--BackendApp.platform={kind.platform}",) if kind.platform else ()
    backend = Backend(tmp, runtime=kind.runtime, extra=extra)
    result = KindResult(kind)
    try:
        backend.start()
        print(f"{kind.label}: backend {backend.address} (log {backend.log_path})", flush=True)
        result = measure(kind, backend, args)
        leftovers = backend.leftover_sandboxes()
        if leftovers:
            print(f"WARNING: sandboxes left after shutdown: {[s['id'] for s in leftovers]}; removing",
                  file=sys.stderr)
            backend.remove_sandboxes([s["id"] for s in leftovers])
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        print(f"{kind.label}: FAILED\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    finally:
        backend.stop()
        if result.error:
            print(f"kept the state dir {tmp}; backend log: {backend.log_path}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


# --- report ---------------------------------------------------------------------------------------
def print_table(summaries: list[dict[str, Any]]) -> None:
    cols = ["kernel", "kernels", "% core/kernel", "sandbox %", "backend share %", "x local", "backend %",
            "client %", f"< {TARGET_PERCENT:g} %"]
    rows = [cols]
    for s in summaries:
        if "cpu_percent_per_kernel" not in s:
            rows.append([s["kernel"], str(s["kernels"]), "FAILED"] + [""] * (len(cols) - 3))
            continue
        pct = s["cpu_percent_per_kernel"]
        ratio = "-"
        if "ratio_to_local" in s:
            ratio = f"{s['ratio_to_local']:.1f}"
        elif "ratio_to_local_at_least" in s:
            ratio = f">{s['ratio_to_local_at_least']:.1f}"
        rows.append([s["kernel"], str(s["kernels"]), f"{pct:.3f}", f"{s['sandbox_percent_per_kernel']:.3f}",
                     f"{s['backend_share_percent_per_kernel']:.3f}", ratio,
                     "-" if s["backend_percent"] is None else f"{s['backend_percent']:.3f}",
                     f"{s['client_percent']:.3f}", "OK" if pct < TARGET_PERCENT else "MISSED"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    print()
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                               strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for s in summaries:
        if s.get("parts_percent_per_kernel"):
            top = ", ".join(f"{k} {v:.3f}" for k, v in list(s["parts_percent_per_kernel"].items())[:5])
            print(f"{s['kernel']}: per kernel, % of a core by process: {top}")
    for s in summaries:
        if s["error"]:
            print(f"{s['kernel']}: FAILED: {s['error']}")


def kinds_for(args: argparse.Namespace) -> list[IdleKind]:
    kinds = [IdleKind("local ipykernel", KernelKind("local ipykernel", "python3", baseline=True))]
    if "process" in args.runtimes:
        kinds.append(IdleKind("snapkernel (process)",
                              KernelKind("snapkernel (process)", "snapkernel-python", {"runtime": "process"}),
                              "process"))
    if "gvisor" in args.runtimes:
        if not shutil.which("runsc"):
            print("runsc not found: no gvisor kinds (`make install` as root installs it)", file=sys.stderr)
        else:
            spec = KernelKind("snapkernel (gvisor)", "snapkernel-bench-gvisor", {"runtime": "gvisor"})
            for p in args.gvisor_platforms or [""]:
                kinds.append(IdleKind(f"snapkernel (gvisor{', ' + p if p else ''})", spec, "gvisor", p))
    return kinds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--kernels", type=int, default=3, help="idle kernels per kind (default 3)")
    p.add_argument("--seconds", type=float, default=30.0, help="measurement window in seconds (default 30)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait after the kernels are ready, before measuring (default 5)")
    p.add_argument("--runtimes", nargs="+", choices=["process", "gvisor"], default=["process", "gvisor"])
    p.add_argument("--gvisor-platforms", nargs="+", choices=["systrap", "ptrace", "kvm"], default=None,
                   help="measure gvisor once per platform (default: the backend's own choice)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per start or cell")
    p.add_argument("--json", "--out", dest="json", type=Path, default=DEFAULT_OUT,
                   help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.kernels < 1 or args.seconds <= 0:
        p.error("--kernels must be at least 1 and --seconds positive")

    kinds = kinds_for(args)
    prefix = Path(tempfile.mkdtemp(prefix="snapkernel-bench-idle-specs-"))
    try:
        install_kernelspecs(prefix, [k.kernel for k in kinds])
        results = [run_kind(kind, args) for kind in kinds]
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
    summaries = [r.summary() for r in results]
    base = next((s for s in summaries if s["runtime"] == "local" and "cpu_percent_per_kernel" in s), None)
    for s in summaries:
        if base and s is not base and "cpu_percent_per_kernel" in s:
            if base["cpu_percent_per_kernel"] > 0:
                s["ratio_to_local"] = s["cpu_percent_per_kernel"] / base["cpu_percent_per_kernel"]
            else:  # the local kernels used less than one clock tick in all: the ratio is at least this
                tick = 100 / CLK_TCK / (base["kernels"] * base["seconds"])
                s["ratio_to_local_at_least"] = s["cpu_percent_per_kernel"] / tick
        if "cpu_percent_per_kernel" in s:
            s["target_ok"] = s["cpu_percent_per_kernel"] < TARGET_PERCENT
    print_table(summaries)
    report = {
        "benchmark": "idle",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                 "loadavg": os.getloadavg()},
        "params": {"kernels": args.kernels, "seconds": args.seconds, "settle": args.settle,
                   "target_percent": TARGET_PERCENT},
        "kinds": summaries,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.json}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
