"""Cold fan-out: `%%fanout --over range(4) --as x --workers 4` of `x * 2` with no warm worker, the whole cell.

For each kind of backend (see `SETUPS`) this starts its own backend and a snapkernel kernel on it, then, over
`--runs` rounds, removes every fan-out worker (so none is warm) and times:

- the whole cell from the kernel: from sending the `execute_request` until its `execute_reply`, as a
  notebook waits for it (the kernel's agent relays the job to the backend, which starts 4 worker sandboxes);
- the same map call from this process (`snapkernel.fanout.client.MapCall`, the gRPC path a script takes);
- the cell again at once, its workers now warm (for the cold/warm ratio).

Setups: the process runtime; and under gvisor, where runsc works, once with templates off (every worker boots,
as every worker did before worker templates) and once with them on (the workers of the default class restore
its worker template, waited for before the runs). It prints a table and the ratios (cold against warm, gvisor
templates against booted), and writes the same as JSON (default `bench/results/fanout_cold.json`). The issue's
targets (gvisor 2.2 s -> 0.8 s, process 1.1 s -> 0.5 s for the cell) are printed beside them, not enforced.

    .venv/bin/python bench/fanout_cold.py [--runs 5] [--only process|gvisor]

On a failure the temporary state dir (with the backend log, `backend.log`) is kept and its path printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_latency as kl  # the bench's backend, percentile and table

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "fanout_cold.json"
WORKERS = 4
CELL = f"%%fanout --over range({WORKERS}) --as x --workers {WORKERS} --out res\nx * 2"
EXPECTED = [x * 2 for x in range(WORKERS)]
TARGETS_S = {"process": 0.5, "gvisor": 0.8}  # the issue's, for the cell; printed, not enforced
# 4 workers and a kernel of the default 4Gi each on a small host: memory is overcommitted, as in the tests,
# so that every run gets its 4 workers.
COMMON_ARGS = ("--BackendApp.memory_overcommit=2",)


@dataclass(frozen=True)
class Setup:
    label: str
    runtime: str
    args: tuple[str, ...] = ()
    worker_template: bool = False  # wait for a ready worker template before the runs


SETUPS = [Setup("process", "process")]
if shutil.which("runsc"):
    SETUPS += [Setup("gvisor, booted workers", "gvisor", ("--BackendApp.templates=False",)),
               Setup("gvisor, worker template", "gvisor", ("--BackendApp.templates=True",), worker_template=True)]


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"mean_s": statistics.fmean(values), "p50_s": kl.percentile(values, 50), "min_s": min(values),
            "max_s": max(values)}


# --- the backend ------------------------------------------------------------------------------------
class Backend(kl.Backend):
    """kernel_latency's backend with this setup's settings, and what the cold runs ask of it."""

    def __init__(self, state_dir: Path, setup: Setup) -> None:
        super().__init__(state_dir, runtime=setup.runtime, extra=(*COMMON_ARGS, *setup.args))
        self.setup = setup
        self.token = ""

    def start(self, timeout: float = 30.0) -> None:
        super().start(timeout)
        self.token = os.environ["SNAPKERNEL_TOKEN"]

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)

    def call(self, fn: Any) -> Any:
        from snapkernel.client import BackendClient

        async def go() -> Any:
            client = BackendClient(self.address, self.token)
            try:
                return await fn(client)
            finally:
                await client.close()

        return asyncio.run(go())

    def workers(self) -> list[str]:
        from snapkernel.backend.workers import is_worker

        return [s.id for s in self.call(lambda c: c.list_sandboxes()) if is_worker(s.spec)]

    def remove_workers(self, timeout: float = 60.0) -> None:
        """No warm worker left: each is deleted (its pool hears of it and drops it)."""
        async def rm(client: Any) -> None:
            for sandbox_id in ids:
                await client.delete_sandbox(sandbox_id)

        ids = self.workers()
        self.call(rm)
        deadline = time.monotonic() + timeout
        while self.workers():
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers still listed after {timeout:g}s: {self.workers()}")
            time.sleep(0.1)

    def worker_templates(self) -> list[dict[str, Any]]:
        from google.protobuf.json_format import MessageToDict

        status = self.call(lambda c: c.status())
        return [MessageToDict(t, preserving_proto_field_name=True) for t in status.templates
                if "worker" in t.spec]

    def wait_for_worker_template(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t["state"] == "ready" for t in self.worker_templates()):
                return True
            time.sleep(0.5)
        return False

    def restored_workers(self) -> int:
        """Workers this backend restored from a template so far (its log says so for each)."""
        text = self.log_path.read_text(errors="replace")
        return text.count("restored from worker template")


# --- measurements -----------------------------------------------------------------------------------
def cell_seconds(kc: Any, timeout: float) -> float:
    """The whole `%%fanout` cell, from execute_request to execute_reply; checks its results."""
    t0 = time.perf_counter()
    reply = kc.execute_interactive(CELL, timeout=timeout, output_hook=lambda msg: None)
    seconds = time.perf_counter() - t0
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"the cell failed: {reply['content'].get('evalue', reply['content'])}")
    check = kc.execute_interactive(
        f"from snapkernel.fanout.client import last_stats\nassert res == {EXPECTED!r}, res\n"
        f"assert last_stats().workers == {WORKERS}, last_stats()", timeout=timeout, output_hook=lambda msg: None)
    if check["content"]["status"] != "ok":
        raise RuntimeError(f"wrong results or workers: {check['content'].get('evalue')}")
    return seconds


def double(x: int) -> int:
    return x * 2


def map_seconds() -> float:
    """The same map from this process, over gRPC."""
    from snapkernel.fanout.capture import pack
    from snapkernel.fanout.client import MapCall, Options

    calls = [(x, (x,), {}) for x in range(WORKERS)]
    t0 = time.perf_counter()
    call = MapCall(pack(double), Options(workers=WORKERS, progress=False), len(calls), "bench")
    out = [value for _, value in call.run(calls)]
    seconds = time.perf_counter() - t0
    if out != EXPECTED:
        raise RuntimeError(f"wrong results: {out}")
    return seconds


def measure(setup: Setup, runs: int, timeout: float, keep: list[Path]) -> dict[str, Any]:
    from jupyter_client.manager import KernelManager

    from snapkernel.kernel_provisioner.kernelspec import install

    row: dict[str, Any] = {"setup": setup.label, "runtime": setup.runtime, "cell_cold_s": [], "map_cold_s": [],
                           "cell_warm_s": []}
    tmp = Path(tempfile.mkdtemp(prefix="snapkernel-bench-cold-"))
    backend = Backend(tmp, setup)
    failed = True
    try:
        backend.start()
        install({}, prefix=str(tmp / "prefix"))
        os.environ["JUPYTER_PATH"] = str(tmp / "prefix" / "share" / "jupyter")
        km = KernelManager(kernel_name="snapkernel-python")
        km.start_kernel()
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=timeout)
            cell_seconds(kc, timeout)  # unmeasured: the kernel's first fan-out imports the client
            map_seconds()
            if setup.worker_template:
                backend.remove_workers()
                row["worker_template_ready"] = backend.wait_for_worker_template(timeout)
                row["worker_templates"] = backend.worker_templates()
            restored_before = backend.restored_workers()
            for i in range(runs):
                backend.remove_workers()
                time.sleep(1.0)  # the removals' own work (runsc delete) is over
                row["cell_cold_s"].append(cell_seconds(kc, timeout))
                row["cell_warm_s"].append(cell_seconds(kc, timeout))
                backend.remove_workers()
                time.sleep(1.0)
                row["map_cold_s"].append(map_seconds())
                print(f"  {setup.label}: run {i + 1}/{runs}: cell cold {row['cell_cold_s'][-1]:.3f} s, warm "
                      f"{row['cell_warm_s'][-1]:.3f} s; map call cold {row['map_cold_s'][-1]:.3f} s", flush=True)
            row["workers_restored"] = backend.restored_workers() - restored_before
            row["workers_started"] = runs * 2 * WORKERS
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        failed = False
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {e}"
        print(f"  {setup.label}: FAILED\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    finally:
        backend.stop()
        if failed:
            keep.append(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for key in ("cell_cold_s", "map_cold_s", "cell_warm_s"):
        row[key.removesuffix("_s")] = summary(row[key])
    if row["cell_cold"] and row["cell_warm"]:
        row["cold_vs_warm"] = row["cell_cold"]["p50_s"] / row["cell_warm"]["p50_s"]
    return row


# --- report -----------------------------------------------------------------------------------------
def comparisons(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["setup"]: r for r in rows}
    out = []
    booted, template = by.get("gvisor, booted workers"), by.get("gvisor, worker template")
    if booted and template and booted["cell_cold"] and template["cell_cold"]:
        out.append({"what": "gvisor cold cell: worker template / booted workers",
                    "ratio": template["cell_cold"]["p50_s"] / booted["cell_cold"]["p50_s"]})
        out.append({"what": "gvisor cold map call: worker template / booted workers",
                    "ratio": template["map_cold"]["p50_s"] / booted["map_cold"]["p50_s"]})
    for r in rows:
        if "cold_vs_warm" in r:
            out.append({"what": f"{r['setup']}: cold cell / warm cell", "ratio": r["cold_vs_warm"]})
    return out


def print_table(rows: list[dict[str, Any]], comps: list[dict[str, Any]]) -> None:
    cols = ["setup", "cell cold p50 s", "cell cold mean s", "cell cold max s", "map cold p50 s", "cell warm p50 s",
            "restored"]
    table = [cols]
    for r in rows:
        if r.get("error"):
            table.append([r["setup"], "FAILED", "", "", "", "", ""])
            continue
        table.append([r["setup"], f"{r['cell_cold']['p50_s']:.3f}", f"{r['cell_cold']['mean_s']:.3f}",
                      f"{r['cell_cold']['max_s']:.3f}", f"{r['map_cold']['p50_s']:.3f}",
                      f"{r['cell_warm']['p50_s']:.3f}", f"{r['workers_restored']}/{r['workers_started']}"])
    kl.print_rows(table)
    for c in comps:
        print(f"{c['what']}: {c['ratio']:.2f}x")
    for r in rows:
        target = TARGETS_S[r["runtime"]]
        if r.get("cell_cold") and (r["runtime"] == "process" or r.get("worker_template_ready")):
            print(f"issue target, {r['setup']}: cold cell p50 {r['cell_cold']['p50_s']:.3f} s "
                  f"(target <= {target:.1f} s)")
        if r.get("error"):
            print(f"{r['setup']}: FAILED: {r['error']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=5, help="cold rounds per setup (default 5)")
    p.add_argument("--only", choices=["process", "gvisor"], help="only the setups of this runtime")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per start, cell or wait")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    keep: list[Path] = []
    rows = [measure(s, args.runs, args.timeout, keep) for s in SETUPS if args.only in (None, s.runtime)]
    comps = comparisons(rows)
    print_table(rows, comps)
    report = {
        "benchmark": "fanout_cold",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "params": {"runs": args.runs, "workers": WORKERS, "cell": CELL, "backend_args": list(COMMON_ARGS)},
        "rows": rows,
        "comparisons": comps,
        "targets_s": TARGETS_S,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    for tmp in keep:
        print(f"kept the state dir {tmp}; backend log: {tmp / 'backend.log'}", file=sys.stderr)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
