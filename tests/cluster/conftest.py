"""A real Ray cluster on loopback for the cluster tests: a head, two nodes (node-1 runs only the process
runtime; node-2 runs gvisor too where runsc works), each with its own state dir and daemon, and the front."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from snapkernel.backend.cluster import local_cluster as lc
from snapkernel.client import BackendClient
from tests.conftest import sandbox_processes

NODE_CPUS = 2.0
FRONT_ARGS = ["--runtime=process", "--BackendApp.default_memory=512Mi", "--BackendApp.placement_timeout=3",
              "--BackendApp.node_lost_after=5"]
SHARED = "shared-snapshots"  # in the cluster's state dir: the snapshot store every node shares
NODE_ARGS = ["--BackendApp.templates=False", "--BackendApp.memory_overcommit=4"]


class Cluster:
    def __init__(self, state_dir: Path, front_args: list[str]) -> None:
        self.state_dir = state_dir
        runtimes = lc.host_runtimes()
        self.config = lc.ClusterConfig(str(state_dir), [
            lc.NodeConfig("node-1", NODE_CPUS, "3Gi", ["process"], NODE_ARGS),
            lc.NodeConfig("node-2", NODE_CPUS, "3Gi", runtimes, NODE_ARGS)], front_args)
        self.state = lc.up(self.config)
        self.address = f"unix://{state_dir / 'backend.sock'}"
        self.token = (state_dir / "token").read_text().strip()

    def env(self) -> dict[str, str]:
        return {"SNAPKERNEL_BACKEND": self.address, "SNAPKERNEL_TOKEN": self.token}

    def call(self, fn: Callable[[BackendClient], Any]) -> Any:
        async def go() -> Any:
            client = BackendClient(self.address, self.token)
            try:
                return await fn(client)
            finally:
                await client.close()

        return asyncio.run(go())

    def node(self, name: str) -> dict[str, Any]:
        return next(n for n in self.state["nodes"] if n["name"] == name)

    def daemon_pid(self, name: str) -> int:
        return int(json.loads((Path(self.node(name)["state_dir"]) / "daemon.json").read_text())["pid"])

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's raylet, its daemon's keeper (the Ray worker of its NodeAgent, which would start
        the daemon again before it noticed the raylet gone) and its daemon, as a machine that dies."""
        os.kill(self.node(name)["raylet_pid"], signal.SIGKILL)
        marker = f"SNAPKERNEL_NODE_STATE_DIR={self.node(name)['state_dir']}\0".encode()
        for pid in sandbox_processes("NodeAgent"):
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{pid}/environ").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        os.kill(self.daemon_pid(name), signal.SIGKILL)

    def restart_front(self, sig: int = signal.SIGKILL) -> None:
        """Stop the front and start another on the same state dir, as an admin (or systemd) would."""
        pid = int(self.state["front_pid"])
        os.kill(pid, sig)
        while lc._alive(pid):
            time.sleep(0.05)
        sock = self.state_dir / "backend.sock"
        sock.unlink(missing_ok=True)
        log = open(self.state_dir / "front.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "snapkernel.cli", "backend", "--placement", "ray", "--ray-address",
             self.state["address"], "--state-dir", str(self.state_dir), "--listen", self.address,
             *self.config.front_args], stdout=log, stderr=log)
        self.state["front_pid"] = proc.pid
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, self.log("front.log")
            time.sleep(0.05)

    @contextlib.contextmanager
    def ray_holds(self, node: str, cpus: float) -> Iterator[None]:
        """Another Ray workload holds `cpus` of `node` (a placement group of its own) while the block runs."""
        code = ("import sys, ray\nfrom ray.util.placement_group import placement_group\n"
                "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
                "g = placement_group([{'CPU': float(sys.argv[3])}], bundle_label_selector=[{'ray.io/node-id': "
                "sys.argv[2]}])\nray.get(g.ready(), timeout=60)\nprint('held', flush=True)\nsys.stdin.read()\n")
        proc = subprocess.Popen([sys.executable, "-c", code, self.state["address"], self.node(node)["node_id"],
                                 str(cpus)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
            yield
        finally:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(30)

    def log(self, name: str) -> str:
        return (self.state_dir / name).read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(self.state["front_pid"]), signal.SIGTERM)  # a front the test started is not the keeper's
        lc.down(self.state_dir)
        for pid in sandbox_processes(str(self.state_dir)):  # what a killed node's daemon left
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for line in Path("/proc/mounts").read_text().splitlines():
            if line.split()[1].startswith(f"{self.state_dir}/"):
                subprocess.run(["umount", "--lazy", line.split()[1]], check=False)

    def report(self) -> None:
        for name in ("cluster.log", "front.log"):
            print(f"--- {name} ---\n{self.log(name)}")
        for n in self.state["nodes"]:
            with contextlib.suppress(OSError):
                print(f"--- {n['name']} daemon.log ---\n" +
                      (Path(n["state_dir"]) / "daemon.log").read_text(errors="replace")[-4000:])


@contextlib.contextmanager
def running_cluster(front_args: list[str] | None = None, store: str = "") -> Iterator[Cluster]:
    """A cluster whose nodes share `store` (default: a directory of its state dir)."""
    with tempfile.TemporaryDirectory(prefix="snapkernel-cluster-") as tmp:
        (Path(tmp) / SHARED).mkdir()
        store = f"--BackendApp.snapshot_store={store or f'file://{Path(tmp) / SHARED}'}"
        cluster = Cluster(Path(tmp), [*FRONT_ARGS, store, *(front_args or [])])
        saved = {k: os.environ.get(k) for k in cluster.env()}
        os.environ.update(cluster.env())
        try:
            yield cluster
        finally:
            cluster.report()
            cluster.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(kernelspec_dir: Path) -> Iterator[Cluster]:
    with running_cluster() as c:
        yield c
