"""REST API cost: snapkernel's routes against Jupyter's own, on one `snapkernel lab` in the same run.

- kernel start: `POST /api/kernels {"name": "snapkernel-python"}` (Jupyter's route) against
  `POST /snapkernel/api/kernels` with a launch-time spec (`{"cpu": 1, "memory": "1Gi"}`), from the request
  until the 201 reply (both reply once the kernel runs), over `--starts` kernels each (mean / p50, seconds);
- kernel poll: `GET /api/kernels/{id}` against `GET /snapkernel/api/kernels/{id}` (what the status bar
  polls every 3 s: the sandbox from the backend plus its CPU, memory and GPU usage), over `--polls`
  requests after 3 unmeasured ones (p50 / p99, milliseconds).

It starts its own `snapkernel lab` (default runtime: gvisor where runsc works) in a temporary state and
root dir, prints a table with snapkernel's figure as a ratio of Jupyter's, and writes JSON (default
`bench/results/rest_api.json`). Run from the repository root:

    .venv/bin/python bench/rest_api.py                  # 5 starts, 200 polls
    .venv/bin/python bench/rest_api.py --starts 2 --polls 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "rest_api.json"
TOKEN = "bench-token"


def percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Lab:
    def __init__(self, tmp: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        (tmp / "root").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPKERNEL_")}
        env["SNAPKERNEL_STATE_DIR"] = str(tmp / "state")
        self.log = tmp / "lab.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapkernel.cli", "lab", "--no-browser", f"--port={port}",
             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp / 'root'}"],
            env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"snapkernel lab did not come up; see {self.log}")
            try:
                self.status = self.call("GET", "snapkernel/api/status")
                break
            except OSError:
                time.sleep(0.5)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}/{path}", data=data, method=method,
                                     headers={"Authorization": f"token {TOKEN}"})
        with urllib.request.urlopen(req, timeout=300) as reply:
            raw = reply.read()
        return json.loads(raw) if raw else None

    def timed(self, method: str, path: str, body: Any = None) -> tuple[float, Any]:
        t0 = time.perf_counter()
        result = self.call(method, path, body)
        return time.perf_counter() - t0, result

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(lab: Lab, starts: int, polls: int) -> dict[str, Any]:
    ways = {
        "jupyter": ("api/kernels", {"name": "snapkernel-python"}, lambda r: r["id"], "api/kernels/{}"),
        "snapkernel": ("snapkernel/api/kernels", {"cpu": 1, "memory": "1Gi"}, lambda r: r["kernel"]["id"],
                       "snapkernel/api/kernels/{}"),
    }
    out: dict[str, Any] = {}
    for label, (route, body, kernel_id, poll_route) in ways.items():
        start_s, poll_ms = [], []
        for i in range(starts):
            elapsed, reply = lab.timed("POST", route, body)
            start_s.append(elapsed)
            kid = kernel_id(reply)
            if i == 0:
                for n in range(polls + 3):
                    took, _ = lab.timed("GET", poll_route.format(kid))
                    if n >= 3:
                        poll_ms.append(took * 1000)
            lab.call("DELETE", f"api/kernels/{kid}")
        out[label] = {"route": route, "body": body, "poll_route": poll_route, "starts_s": start_s,
                      "start_mean_s": statistics.fmean(start_s), "start_p50_s": percentile(start_s, 50),
                      "poll_p50_ms": percentile(poll_ms, 50), "poll_p99_ms": percentile(poll_ms, 99)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--polls", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapkernel-bench-rest-") as tmp:
        lab = Lab(Path(tmp))
        try:
            results = measure(lab, args.starts, args.polls)
        finally:
            lab.stop()
        runtime = lab.status["default_runtime"]
    j, s = results["jupyter"], results["snapkernel"]
    rows = [
        ("kernel start mean (s)", j["start_mean_s"], s["start_mean_s"]),
        ("kernel start p50 (s)", j["start_p50_s"], s["start_p50_s"]),
        ("kernel poll p50 (ms)", j["poll_p50_ms"], s["poll_p50_ms"]),
        ("kernel poll p99 (ms)", j["poll_p99_ms"], s["poll_p99_ms"]),
    ]
    print(f"REST API, runtime {runtime}, {args.starts} starts and {args.polls} polls per route "
          f"({platform.node()}, {os.cpu_count()} cores)")
    print(f"{'':24} {'jupyter':>10} {'snapkernel':>11} {'ratio':>7}")
    for name, a, b in rows:
        print(f"{name:24} {a:10.3f} {b:11.3f} {b / a:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runtime": runtime, "starts": args.starts, "polls": args.polls,
                                    "cores": os.cpu_count(), "results": results,
                                    "ratios": {name: b / a for name, a, b in rows}}, indent=1))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
