"""Kernel latency: a local ipykernel against snapkernel kernels.

For each kernel kind (see `KINDS`) this measures, in one run:

- start time: from `KernelManager.start_kernel()` until the first `kernel_info` reply
  (`client.wait_for_ready`), over `--starts` fresh kernels (mean / p50 / max, seconds);
- execute round-trip of `1+1`, over `--executions` requests after `--warmup` unmeasured ones: from
  sending the `execute_request` until both its `execute_reply` (shell) and the kernel's `idle` status
  for that request (iopub) have arrived, as a real frontend waits for both (p50 / p99, milliseconds).

It starts its own backend (`snapkernel backend --listen unix://TMP/backend.sock --state-dir TMP
--runtime gvisor`, or `process` where runsc is missing), installs the kernelspecs into a temporary prefix
that goes first on JUPYTER_PATH, and compares every snapkernel kind with the local ipykernel against the
issue's targets: round-trip p50 at most 2x local, start at most 0.5 s above local. gvisor kernels are
measured three ways: the default spec's, served by the warm pool; another class's, restored from its
template; and booted (a kernel with variables of its own starts from no template). It prints a table and
writes the same as JSON (default `bench/results/kernel_latency.json`).

Run it from the repository root:

    .venv/bin/python bench/kernel_latency.py                       # 5 starts, 1000 executions
    .venv/bin/python bench/kernel_latency.py --starts 2 --executions 200

On a failure the temporary state dir (with the backend log, `backend.log`) is kept and its path printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "kernel_latency.json"
SNAPKERNEL = [sys.executable, "-m", "snapkernel.cli"]

# The targets, for every snapkernel kind against the local baseline.
TARGET_RTT_P50_RATIO = 2.0
TARGET_START_DIFF_S = 0.5


@dataclass(frozen=True)
class KernelKind:
    """One kind of kernel to measure.

    `provisioner_config` is None for a plain local kernelspec (the venv's ipykernel); otherwise the
    kind is a snapkernel kernelspec named `kernel_name`, written into the temporary prefix with this
    provisioner config (e.g. `{"runtime": "gvisor"}`).
    """

    label: str
    kernel_name: str
    provisioner_config: dict[str, Any] | None = None
    baseline: bool = False
    templates: int = 0  # measured once this many templates are ready (after one unmeasured start)


KINDS: list[KernelKind] = [
    KernelKind("local ipykernel", "python3", baseline=True),
    KernelKind("snapkernel (process)", "snapkernel-bench-process", {"runtime": "process"}),
]
GVISOR = bool(shutil.which("runsc"))  # where runsc is installed (`make install` as root)
if GVISOR:
    # The backend's default spec (gvisor) has the warm pool; another class has a template but no pool.
    KINDS.append(KernelKind("snapkernel (gvisor, warm pool)", "snapkernel-python", {}, templates=1))
    KINDS.append(KernelKind("snapkernel (gvisor, template)", "snapkernel-bench-gvisor-2g",
                            {"runtime": "gvisor", "memory": "2Gi"}, templates=2))
    # Variables of its own keep a kernel off templates: it boots, as every gvisor kernel did before them.
    KINDS.append(KernelKind("snapkernel (gvisor, booted)", "snapkernel-bench-gvisor-boot",
                            {"runtime": "gvisor", "env": {"SNAPKERNEL_BENCH": "boot"}}))


@dataclass
class KindResult:
    label: str
    kernel_name: str
    starts_s: list[float] = field(default_factory=list)
    rtts_ms: list[float] = field(default_factory=list)
    provisioner: str | None = None
    error: str | None = None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kernel": self.label, "kernel_name": self.kernel_name,
                               "provisioner": self.provisioner}
        if self.starts_s:
            out.update(start_mean_s=statistics.fmean(self.starts_s),
                       start_p50_s=percentile(self.starts_s, 50),
                       start_max_s=max(self.starts_s))
        if self.rtts_ms:
            out.update(rtt_p50_ms=percentile(self.rtts_ms, 50), rtt_p99_ms=percentile(self.rtts_ms, 99))
        out["starts_s"] = self.starts_s
        out["executions"] = len(self.rtts_ms)
        out["error"] = self.error
        return out


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in 0..100."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --- set-up: backend and kernelspecs ---------------------------------------------------------------
class Backend:
    """`snapkernel backend` on a unix socket in `state_dir`, logging to `state_dir/backend.log`."""

    def __init__(self, state_dir: Path, runtime: str = "process", extra: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.runtime = runtime
        self.extra = extra  # more `snapkernel backend` arguments, e.g. --BackendApp.gpu_offload=False
        self.socket = state_dir / "backend.sock"
        self.address = f"unix://{self.socket}"
        self.log_path = state_dir / "backend.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*SNAPKERNEL, "backend", "--listen", self.address, "--state-dir", str(self.state_dir),
                 "--runtime", self.runtime, *self.extra],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        token = self.state_dir / "token"
        deadline = time.monotonic() + timeout
        while not (self.socket.exists() and token.exists() and token.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend exited with {self.proc.returncode}; log: {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"backend not ready after {timeout:.0f} s; log: {self.log_path}")
            time.sleep(0.05)
        os.environ["SNAPKERNEL_BACKEND"] = self.address
        os.environ["SNAPKERNEL_TOKEN"] = token.read_text().strip()

    def leftover_sandboxes(self) -> list[dict[str, Any]]:
        out = subprocess.run([*SNAPKERNEL, "sandboxes", "list", "--json"], capture_output=True, text=True,
                             timeout=60, check=True)
        return list(json.loads(out.stdout or "[]"))

    def remove_sandboxes(self, ids: list[str]) -> None:
        subprocess.run([*SNAPKERNEL, "sandboxes", "rm", *ids], capture_output=True, timeout=120, check=False)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def install_kernelspecs(prefix: Path, kinds: list[KernelKind]) -> None:
    """Install the local and snapkernel specs under `prefix` and put it first on JUPYTER_PATH."""
    from jupyter_client.kernelspec import KernelSpecManager

    from snapkernel.kernel_provisioner.kernelspec import install, kernel_json, specs_for

    install({}, prefix=str(prefix))  # snapkernel-python (and nothing GPU)
    stock = specs_for({})
    ksm = KernelSpecManager()
    for kind in kinds:
        if kind.provisioner_config is None:
            spec: dict[str, Any] = {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": f"{kind.label} (bench)", "language": "python",
                "metadata": {"debugger": False},
            }
        elif kind.kernel_name in stock:
            continue  # the stock spec, on the backend's default runtime
        else:
            spec = kernel_json(f"{kind.label} (bench)", kind.provisioner_config)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "kernel.json").write_text(json.dumps(spec, indent=1))
            ksm.install_kernel_spec(tmp, kernel_name=kind.kernel_name, prefix=str(prefix))
    jupyter_path = os.environ.get("JUPYTER_PATH")
    share = str(prefix / "share" / "jupyter")
    os.environ["JUPYTER_PATH"] = share + (os.pathsep + jupyter_path if jupyter_path else "")


# --- measurements ---------------------------------------------------------------------------------
def start_kernel(kind: KernelKind, timeout: float) -> tuple[KernelManager, BlockingKernelClient, float]:
    """Start one kernel; returns it, its client and the seconds until the first kernel_info reply."""
    km = KernelManager(kernel_name=kind.kernel_name)
    if kind.provisioner_config is None and km.kernel_spec.argv[0] != sys.executable:
        raise RuntimeError(f"{kind.kernel_name} runs {km.kernel_spec.argv[0]}, not {sys.executable}")
    t0 = time.perf_counter()
    try:
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=timeout)
    except BaseException:
        stop_kernel(km, None)
        raise
    return km, kc, time.perf_counter() - t0


def wait_for_templates(count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([*SNAPKERNEL, "status", "--json"], capture_output=True, text=True, timeout=60, check=True)
        if sum(t["state"] == "ready" for t in json.loads(out.stdout).get("templates", [])) >= count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"fewer than {count} templates ready after {timeout:g}s")


def stop_kernel(km: KernelManager, kc: BlockingKernelClient | None) -> None:
    if kc is not None:
        kc.stop_channels()
    if km.has_kernel:
        km.shutdown_kernel()
    km.cleanup_resources()


def execute_rtt(kc: BlockingKernelClient, code: str, timeout: float) -> float:
    """Seconds from sending `code` until its execute_reply and its iopub idle status have both arrived."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code, store_history=False)
    deadline = t0 + timeout
    got_reply = got_idle = False
    while not got_reply:
        msg = kc.get_shell_msg(timeout=max(deadline - time.perf_counter(), 0.001))
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
            if msg["content"]["status"] != "ok":
                raise RuntimeError(f"execute failed: {msg['content']}")
            got_reply = True
    while not got_idle:
        msg = kc.get_iopub_msg(timeout=max(deadline - time.perf_counter(), 0.001))
        got_idle = (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle")
    return time.perf_counter() - t0


def measure(kind: KernelKind, starts: int, executions: int, warmup: int, timeout: float) -> KindResult:
    result = KindResult(kind.label, kind.kernel_name)
    try:
        if kind.templates:
            stop_kernel(*start_kernel(kind, timeout)[:2])
            wait_for_templates(kind.templates, timeout)
            time.sleep(2)  # and the warm pool refilled
        for i in range(starts):
            km, kc, seconds = start_kernel(kind, timeout)
            result.starts_s.append(seconds)
            result.provisioner = type(km.provisioner).__name__
            print(f"  {kind.label}: start {i + 1}/{starts}: {seconds:.3f} s", flush=True)
            if i < starts - 1:
                stop_kernel(km, kc)
        # the round trips run on the last kernel started
        try:
            for _ in range(warmup):
                execute_rtt(kc, "1+1", timeout)
            for _ in range(executions):
                result.rtts_ms.append(execute_rtt(kc, "1+1", timeout) * 1000)
            print(f"  {kind.label}: {executions} executions done", flush=True)
        finally:
            stop_kernel(km, kc)
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        print(f"  {kind.label}: FAILED\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    return result


# --- report ---------------------------------------------------------------------------------------
def comparisons(kinds: list[KernelKind], results: list[KindResult]) -> list[dict[str, Any]]:
    base = next((r.summary() for k, r in zip(kinds, results, strict=True) if k.baseline), None)
    out = []
    for kind, r in zip(kinds, results, strict=True):
        s = r.summary()
        if kind.baseline or base is None or "rtt_p50_ms" not in s or "rtt_p50_ms" not in base:
            continue
        ratio = s["rtt_p50_ms"] / base["rtt_p50_ms"]
        diff = s["start_mean_s"] - base["start_mean_s"]
        out.append({"kernel": r.label, "baseline": base["kernel"],
                    "rtt_p50_ratio": ratio, "rtt_p50_ratio_target": TARGET_RTT_P50_RATIO,
                    "rtt_p50_ratio_ok": ratio <= TARGET_RTT_P50_RATIO,
                    "start_mean_diff_s": diff, "start_mean_diff_target_s": TARGET_START_DIFF_S,
                    "start_mean_diff_ok": diff <= TARGET_START_DIFF_S})
    return out


def print_rows(rows: list[list[str]]) -> None:
    """A table: its first row the header, the first column left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                               strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print()


def print_table(summaries: list[dict[str, Any]], comps: list[dict[str, Any]]) -> None:
    cols = [("kernel", "kernel", "{}"), ("start_mean_s", "start mean s", "{:.3f}"),
            ("start_p50_s", "start p50 s", "{:.3f}"), ("start_max_s", "start max s", "{:.3f}"),
            ("rtt_p50_ms", "rtt p50 ms", "{:.3f}"), ("rtt_p99_ms", "rtt p99 ms", "{:.3f}")]
    rows = [[h for _, h, _ in cols]]
    for s in summaries:
        rows.append([fmt.format(s[key]) if key in s else "FAILED" for key, _, fmt in cols])
    print_rows(rows)
    for c in comps:
        rtt_ok = "OK" if c["rtt_p50_ratio_ok"] else "MISSED"
        start_ok = "OK" if c["start_mean_diff_ok"] else "MISSED"
        print(f"{c['kernel']} vs {c['baseline']}:")
        print(f"  rtt p50 ratio    {c['rtt_p50_ratio']:7.2f}x   "
              f"target <= {c['rtt_p50_ratio_target']:.1f}x    {rtt_ok}")
        print(f"  start mean diff  {c['start_mean_diff_s']:+6.3f} s   "
              f"target <= +{c['start_mean_diff_target_s']:.1f} s  {start_ok}")
    for s in summaries:
        if s["error"]:
            print(f"{s['kernel']}: FAILED: {s['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--starts", type=int, default=5, help="kernel starts per kind (default 5)")
    p.add_argument("--executions", type=int, default=1000, help="measured `1+1` executions (default 1000)")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured executions first (default 50)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per start or execution")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.starts < 1 or args.executions < 1:
        p.error("--starts and --executions must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="snapkernel-bench-"))
    backend = Backend(tmp, runtime="gvisor" if GVISOR else "process")
    failed = True
    try:
        backend.start()
        install_kernelspecs(tmp / "prefix", KINDS)
        print(f"backend {backend.address} (log {backend.log_path})", flush=True)
        results = [measure(kind, args.starts, args.executions, args.warmup, args.timeout) for kind in KINDS]
        leftovers = backend.leftover_sandboxes()
        if leftovers:
            print(f"WARNING: sandboxes left after shutdown: {[s['id'] for s in leftovers]}; removing",
                  file=sys.stderr)
            backend.remove_sandboxes([s["id"] for s in leftovers])
        summaries = [r.summary() for r in results]
        comps = comparisons(KINDS, results)
        print_table(summaries, comps)
        report = {
            "benchmark": "kernel_latency",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"python": sys.version.split()[0], "platform": platform.platform(),
                     "cpus": os.cpu_count()},
            "params": {"starts": args.starts, "executions": args.executions, "warmup": args.warmup,
                       "code": "1+1"},
            "kernels": summaries,
            "comparisons": comps,
            "leftover_sandboxes": [s["id"] for s in leftovers],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.out}")
        failed = any(r.error for r in results) or bool(leftovers)
    finally:
        backend.stop()
        if failed:
            print(f"kept the state dir {tmp}; backend log: {backend.log_path}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
