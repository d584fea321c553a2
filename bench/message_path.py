"""Where an execute round trip spends its time: one `1+1` from a Jupyter client to the kernel and back, hop by hop.

Every process on the way marks the frames it passes on when SNAPKERNEL_TRACE_HOPS is set
(`snapkernel/protocol/hops.py`): the relay (in this process, as in a Jupyter server), the backend, the sandbox's
shim and its agent; the kernel's own messages carry their send time in their header. For each execution this
lines the marks up between sending the `execute_request` and receiving the last of its `execute_reply` and
`idle` status, and reports the median of each hop: the way in (to the kernel), the kernel itself, and the way
back of the last message. A local ipykernel is measured beside it as the baseline (round trip only).

    .venv/bin/python bench/message_path.py                        # process and (with runsc) gvisor kernels
    .venv/bin/python bench/message_path.py --executions 300 --runtimes process

Prints the table and writes JSON (default `bench/results/message_path.json`). The marks cost a few
microseconds each, so the round trips measured here are a little slower than `bench/kernel_latency.py`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["SNAPKERNEL_TRACE_HOPS"] = "1"  # before snapkernel is imported, here and in the backend it starts

import kernel_latency as kl  # the bench's backend and kernel helpers

from snapkernel.protocol import hops

DEFAULT_OUT = kl.REPO / "bench" / "results" / "message_path.json"

# (label, from, to): each hop is the time between two marks. The way in takes the first mark of each name after
# the request was sent; the way back the last mark before the client had both answers.
WAY_IN = [("client → relay (ZMQ)", "client_send", "relay_in"),
          ("relay → backend (gRPC)", "relay_in", "backend_in"),
          ("backend", "backend_in", "link_out"),
          ("backend → shim (unix socket)", "link_out", "shim_in"),
          ("shim → agent (stdio)", "shim_in", "agent_in"),
          ("agent → kernel (ZMQ)", "agent_in", "kernel_in")]
KERNEL = [("request to idle", "kernel_in", "kernel_idle")]
WAY_BACK = [("kernel → agent (ZMQ)", "kernel_idle", "kernel_out"),
            ("agent", "kernel_out", "agent_out"),
            ("agent → shim (stdio)", "agent_out", "shim_out"),
            ("shim → backend (unix socket)", "shim_out", "link_in"),
            ("backend", "link_in", "backend_out"),
            ("backend → relay (gRPC)", "backend_out", "relay_out"),
            ("relay → client (ZMQ)", "relay_out", "client_done")]
HOPS = [("in", *h) for h in WAY_IN] + [("kernel", *h) for h in KERNEL] + [("back", *h) for h in WAY_BACK]


def read_marks(path: Path) -> list[tuple[int, str]]:
    marks = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(hops.PREFIX):
            _, ns, name = line.split(maxsplit=2)
            marks.append((int(ns), name))
    return marks


def run_kind(kind: kl.KernelKind, state_dir: Path, executions: int, warmup: int, timeout: float, *,
             own_marks: Path) -> dict[str, Any]:
    """Round trips of one kernel (ms); for a snapkernel kernel also each hop's times (ms, one per run)."""
    km, kc, _ = kl.start_kernel(kind, timeout)
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(warmup):
            kl.execute_rtt(kc, "1+1", timeout)
        for _ in range(executions):
            sent = time.time_ns()
            msg_id = kc.execute("1+1", store_history=False)
            idle_date = None
            got_reply = False
            while not got_reply:
                msg = kc.get_shell_msg(timeout=timeout)
                got_reply = msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply"
            while idle_date is None:
                msg = kc.get_iopub_msg(timeout=timeout)
                if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle"):
                    idle_date = int(msg["header"]["date"].timestamp() * 1e9)
            runs.append({"client_send": sent, "client_done": time.time_ns(), "kernel_idle": idle_date})
            time.sleep(0.01)  # one request at a time: the marks of one run never mix with the next's
        rtts = [(r["client_done"] - r["client_send"]) / 1e6 for r in runs]
        sandbox_id = getattr(km.provisioner, "sandbox_id", None)
        if not sandbox_id:  # the local ipykernel: round trips only
            return {"rtts_ms": rtts, "hops_ms": {}}
        sandbox_log = state_dir / "sandboxes" / sandbox_id / "sandbox.log"  # read before the kernel stops
        marks = read_marks(sandbox_log) if sandbox_log.exists() else []
        marks += read_marks(state_dir / "backend.log") + read_marks(own_marks)
        return {"rtts_ms": rtts, "hops_ms": hop_times(runs, sorted(marks))}
    finally:
        kl.stop_kernel(km, kc)


def hop_times(runs: list[dict[str, Any]], marks: list[tuple[int, str]]) -> dict[str, list[float]]:
    """Milliseconds of each hop, one per run that has all its marks."""
    out: dict[str, list[float]] = {f"{part}: {label}": [] for part, label, _, _ in HOPS}
    for run in runs:
        inside = [(t, n) for t, n in marks if run["client_send"] <= t <= run["client_done"]]
        at = dict(run)
        for t, name in inside:  # the first of each name on the way in
            at.setdefault(name, t)
        back = dict(run)
        for t, name in inside:  # the last of each name on the way back
            back[name] = t
        for part, label, start, end in HOPS:
            times = back if part == "back" else at
            if start in times and end in times:
                out[f"{part}: {label}"].append((times[end] - times[start]) / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--executions", type=int, default=200, help="measured `1+1` executions per kernel (default 200)")
    p.add_argument("--warmup", type=int, default=30, help="unmeasured executions first (default 30)")
    p.add_argument("--runtimes", nargs="+", choices=["process", "gvisor"],
                   default=["process", "gvisor"] if kl.GVISOR else ["process"])
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.executions < 1:
        p.error("--executions must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="snapkernel-bench-"))
    own_marks = tmp / "relay-marks.log"
    hops.ENABLED, hops.out = True, own_marks.open("w")  # this process's relay marks its hops too
    kinds = [kl.KernelKind("local ipykernel", "python3", baseline=True)]
    kinds += [kl.KernelKind(f"snapkernel ({rt})", f"snapkernel-bench-{rt}", {"runtime": rt}) for rt in args.runtimes]
    # Booted kernels only: the path is the same from a template, and an idle pool would only add noise.
    backend = kl.Backend(tmp, runtime=args.runtimes[-1],
                         extra=("--BackendApp.templates=False", "--BackendApp.warm_pool=0"))
    failed = True
    try:
        backend.start()
        kl.install_kernelspecs(tmp / "prefix", kinds)
        results = {}
        for kind in kinds:
            print(f"{kind.label} ...", flush=True)
            results[kind.label] = run_kind(kind, tmp, args.executions, args.warmup, args.timeout, own_marks=own_marks)
        print_table(results)
        report = {
            "benchmark": "message_path", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
            "params": {"executions": args.executions, "warmup": args.warmup, "code": "1+1"},
            "kernels": {label: summary(r) for label, r in results.items()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.out}")
        failed = False
    finally:
        backend.stop()
        hops.out.close()
        if failed:
            print(f"kept the state dir {tmp}; backend log: {backend.log_path}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"rtt_p50_ms": statistics.median(result["rtts_ms"]),
            "hops_p50_ms": {h: statistics.median(v) for h, v in result["hops_ms"].items() if v},
            "runs_with_all_marks": min((len(v) for v in result["hops_ms"].values()), default=0)}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    labels = list(results)
    sums = {label: summary(r) for label, r in results.items()}
    rows = [["hop (median ms)", *labels]]
    for part, label, _, _ in HOPS:
        key = f"{part}: {label}"
        rows.append([key, *(f"{sums[k]['hops_p50_ms'][key]:.3f}" if key in sums[k]["hops_p50_ms"] else "-"
                            for k in labels)])
    rows.append(["sum of hops", *(f"{sum(sums[k]['hops_p50_ms'].values()):.3f}" if sums[k]["hops_p50_ms"] else "-"
                                  for k in labels)])
    rows.append(["round trip p50", *(f"{sums[k]['rtt_p50_ms']:.3f}" for k in labels)])
    base = sums[labels[0]]["rtt_p50_ms"]
    rows.append(["vs local ipykernel", *(f"{sums[k]['rtt_p50_ms'] / base:.2f}x" for k in labels)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(labels) + 1)]
    print()
    for n, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    sys.exit(main())
