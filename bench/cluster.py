"""Many hosts: the cluster's front against the single-host backend, in one run (ratios, not fixed numbers).

- kernel start: CreateSandbox until RUNNING (WatchSandbox), process runtime, `--starts` times each way;
- execute round trip of `1+1` through a real kernel (jupyter_client and the provisioner), p50 over
  `--executions`, after a warm-up;
- `remote(...).map` of 100 items of 50 ms from a plain process: 2 workers on the single host against 4 through
  the front (2 nodes x 2 workers), with warm workers (a first, unmeasured run starts them);
- placement accounting: `--placements` placement groups of a sandbox's bundle reserved through Ray and released,
  the time each way, and Ray's free resources checked to be exactly what was given out (and all back after).

It starts a single-host backend and `snapkernel cluster up`-style cluster (head + `--nodes` nodes, each
`--cpus` CPUs) in temporary state dirs, prints a table and writes JSON (default bench/results/cluster.json).

    .venv/bin/python bench/cluster.py
    .venv/bin/python bench/cluster.py --starts 5 --executions 200 --placements 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

from bench.kernel_latency import print_rows
from snapkernel.backend.cluster import local_cluster as lc
from snapkernel.backend.cluster import resources
from snapkernel.client import BackendClient
from snapkernel.kernel_provisioner.kernelspec import kernel_json
from snapkernel.protocol.v1 import backend_pb2 as pb

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results" / "cluster.json"
TARGETS = {"start_diff_s": 0.15, "rtt_ratio": 1.2, "fanout_ratio": 0.6, "placement_s": 10.0}
QUIET = ["--BackendApp.templates=False", "--BackendApp.warm_pool=0", "--BackendApp.memory_overcommit=4"]


def single_host(state: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    state.mkdir(parents=True)
    sock = state / "backend.sock"
    proc = subprocess.Popen([sys.executable, "-m", "snapkernel.cli", "backend", "--listen", f"unix://{sock}",
                             "--state-dir", str(state), "--runtime", "process", *QUIET],
                            stdout=open(state / "backend.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    while not sock.exists():
        if proc.poll() is not None:
            raise SystemExit(f"the single-host backend did not start: {(state / 'backend.log').read_text()}")
        time.sleep(0.05)
    return proc, {"SNAPKERNEL_BACKEND": f"unix://{sock}", "SNAPKERNEL_TOKEN": (state / "token").read_text().strip()}


def call(env: dict[str, str], fn: Callable[[BackendClient], Any]) -> Any:
    async def go() -> Any:
        client = BackendClient(env["SNAPKERNEL_BACKEND"], env["SNAPKERNEL_TOKEN"])
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(go())


def starts(env: dict[str, str], count: int) -> list[float]:
    async def one(client: BackendClient) -> float:
        t = time.perf_counter()
        sb = await client.create_sandbox(pb.CreateSandboxRequest(spec=pb.SandboxSpec(cpu=0.5, memory="256Mi")))
        async for event in client.watch(sb.id):
            if event.sandbox.state == pb.RUNNING:
                break
            if event.sandbox.state in (pb.FAILED, pb.EXITED, pb.LOST):
                raise SystemExit(f"sandbox {sb.id} did not start: {event.sandbox.message}")
        took = time.perf_counter() - t
        await client.delete_sandbox(sb.id)
        return took

    async def all_of(client: BackendClient) -> list[float]:
        return [await one(client) for _ in range(count)]

    result: list[float] = call(env, all_of)
    return result


def round_trips(env: dict[str, str], kernel: str, count: int) -> list[float]:
    os.environ.update(env)
    km = KernelManager(kernel_name=kernel)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        times = []
        for i in range(count + 20):
            t = time.perf_counter()
            msg_id = kc.execute("1+1")
            while kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
                pass
            while True:
                msg = kc.get_iopub_msg(timeout=30)
                if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                        and msg["content"]["execution_state"] == "idle"):
                    break
            if i >= 20:
                times.append(time.perf_counter() - t)
        return times
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def fanout(env: dict[str, str], workers: int) -> float:
    os.environ.update(env)
    from snapkernel import remote

    def item(x: int) -> int:
        time.sleep(0.05)
        return x

    f = remote(workers=workers, cpu=0.5, memory="256Mi", progress=False)(item)
    assert f.map(range(100)) == list(range(100))  # starts the workers
    t = time.perf_counter()
    assert f.map(range(100)) == list(range(100))
    return time.perf_counter() - t


def placements(ray_address: str, count: int) -> dict[str, Any]:
    """Reserve `count` sandbox bundles as the front does, check Ray's books, release them, check again."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    ray.init(address=ray_address, logging_level="WARNING", log_to_driver=False)
    try:
        def free() -> float:
            return sum(r.get(resources.NODE, 0.0) for r in ray._private.state.state.available_resources_per_node()
                       .values())

        before = free()
        wants = {"CPU": 0.001, "memory": 1024.0, resources.NODE: resources.SLIVER,
                 resources.runtime_resource("process"): resources.SLIVER}
        t = time.perf_counter()
        groups = [placement_group([wants], strategy="STRICT_PACK") for _ in range(count)]
        ray.get([g.ready() for g in groups])
        placed = time.perf_counter() - t
        time.sleep(1.0)  # the raylets report their books to the GCS every so often
        held = before - free()
        t = time.perf_counter()
        for g in groups:
            remove_placement_group(g)
        released = time.perf_counter() - t
        deadline = time.monotonic() + 30
        while abs(free() - before) > 1e-6 and time.monotonic() < deadline:
            time.sleep(0.2)
        return {"placements": count, "place_s": placed, "release_s": released,
                "held_exact": abs(held - count * resources.SLIVER) < 1e-6,
                "released_exact": abs(free() - before) < 1e-6}
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--executions", type=int, default=300)
    ap.add_argument("--placements", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="snapkernel-bench-cluster-") as tmp:
        root = Path(tmp)
        specs = root / "share"
        (specs / "kernels" / "bench-cluster").mkdir(parents=True)
        (specs / "kernels" / "bench-cluster" / "kernel.json").write_text(json.dumps(
            kernel_json("bench-cluster", {"runtime": "process", "cpu": 0.5, "memory": "256Mi"})))
        os.environ["JUPYTER_PATH"] = str(specs)
        single, single_env = single_host(root / "single")
        config = lc.ClusterConfig(str(root / "cluster"), [
            lc.NodeConfig(f"node-{i + 1}", args.cpus, "4Gi", ["process"], QUIET) for i in range(args.nodes)],
            ["--runtime=process", "--BackendApp.default_memory=256Mi"])
        print(f"starting a cluster of {args.nodes} node(s) ...", file=sys.stderr)
        state = lc.up(config)
        front_env = {"SNAPKERNEL_BACKEND": f"unix://{root / 'cluster' / 'backend.sock'}",
                     "SNAPKERNEL_TOKEN": (root / "cluster" / "token").read_text().strip()}
        try:
            res: dict[str, Any] = {"machine": platform.node(), "cpus": os.cpu_count(), "nodes": args.nodes}
            for name, env in (("single", single_env), ("front", front_env)):
                s = starts(env, args.starts)
                r = round_trips(env, "bench-cluster", args.executions)
                res[name] = {"start_p50_s": statistics.median(s), "start_mean_s": statistics.mean(s),
                             "rtt_p50_ms": statistics.median(r) * 1000,
                             "rtt_p99_ms": sorted(r)[int(len(r) * .99)] * 1000}
            res["single"]["fanout_s"] = fanout(single_env, 2)
            res["front"]["fanout_s"] = fanout(front_env, 2 * args.nodes)
            res["placement"] = placements(state["address"], args.placements)
        finally:
            lc.down(root / "cluster")
            single.terminate()
            single.wait(30)
    s, f, p = res["single"], res["front"], res["placement"]
    res["start_diff_s"] = f["start_p50_s"] - s["start_p50_s"]
    res["rtt_ratio"] = f["rtt_p50_ms"] / s["rtt_p50_ms"]
    res["fanout_ratio"] = f["fanout_s"] / s["fanout_s"]
    res["targets"] = TARGETS
    rows = [["figure", "single host", "front", "result", "target", ""],
            ["kernel start p50 (s)", f"{s['start_p50_s']:.3f}", f"{f['start_p50_s']:.3f}",
             f"{res['start_diff_s']:+.3f} s", "<= +0.15 s", ok(res["start_diff_s"] <= TARGETS["start_diff_s"])],
            ["execute rtt p50 (ms)", f"{s['rtt_p50_ms']:.2f}", f"{f['rtt_p50_ms']:.2f}", f"{res['rtt_ratio']:.2f}x",
             "<= 1.2x", ok(res["rtt_ratio"] <= TARGETS["rtt_ratio"])],
            [f"fan-out 100 x 50 ms (s), 2 vs {2 * args.nodes} workers", f"{s['fanout_s']:.2f}", f"{f['fanout_s']:.2f}",
             f"{res['fanout_ratio']:.2f}x", "<= 0.6x", ok(res["fanout_ratio"] <= TARGETS["fanout_ratio"])],
            [f"place {p['placements']} sandboxes (s)", "-", f"{p['place_s']:.2f}", "exact" if p["held_exact"] else
             "NOT EXACT", "<= 10 s", ok(p["place_s"] <= TARGETS["placement_s"] and p["held_exact"])],
            [f"release {p['placements']} (s)", "-", f"{p['release_s']:.2f}", "exact" if p["released_exact"] else
             "NOT EXACT", "<= 10 s", ok(p["release_s"] <= TARGETS["placement_s"] and p["released_exact"])]]
    print_rows(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


def ok(met: bool) -> str:
    return "OK" if met else "MISSED"


if __name__ == "__main__":
    main()
