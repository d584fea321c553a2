"""`snapkernel cluster up|down|resources`: a whole cluster on one machine, for trying it and for tests.

`up` starts a keeper process (detached) that runs a local Ray head (no CPUs: nothing is placed there), N worker
nodes, each with its own state dir under DIR/nodes and its own resources, and the front, serving
`unix://DIR/backend.sock` with its token in `DIR/token`. `down` stops the keeper, which stops the front, then
the nodes' daemons (removing their sandboxes), then Ray. DIR/cluster.json says what runs, for `down` and tests.
On real hosts Ray's own `ray start` runs each node instead (`snapkernel cluster resources` gives its
`--resources`), and the front is `snapkernel backend --placement ray --ray-address ADDR`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from snapkernel.backend.cluster.node_agent import RECORD
from snapkernel.backend.cluster.resources import node_resources
from snapkernel.errors import BackendUnavailableError, InvalidSpecError
from snapkernel.host.gpus import inventory
from snapkernel.protocol.spec import parse_memory

STATE = "cluster.json"
UP_TIMEOUT = 180.0
# Ray notices a dead node within seconds, not the 15-55 s of its defaults: a trial cluster's nodes die on purpose.
FAST_FAILURE_DETECTION = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
                          "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def host_runtimes() -> list[str]:
    """The runtimes this host's daemons can run: process always, gvisor where runsc is installed."""
    return ["process", "gvisor"] if shutil.which("runsc") else ["process"]


@dataclass
class NodeConfig:
    name: str
    cpus: float = 2.0
    memory: str = "4Gi"
    runtimes: list[str] = field(default_factory=host_runtimes)
    args: list[str] = field(default_factory=list)  # more `snapkernel backend` arguments for its daemon


@dataclass
class ClusterConfig:
    state_dir: str
    nodes: list[NodeConfig]
    front_args: list[str] = field(default_factory=list)


def host_resources() -> dict[str, float]:
    """This host's `ray start --resources`: its runtimes and GPU models."""
    gpus, _, _ = inventory()
    models: dict[str, int] = {}
    for g in gpus:
        models[g.model] = models.get(g.model, 0) + 1
    return node_resources(host_runtimes(), models)


def read_state(state_dir: Path) -> dict[str, Any]:
    try:
        found: dict[str, Any] = json.loads((state_dir / STATE).read_text())
        return found
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


# --- the keeper ----------------------------------------------------------------------------------------
def keep(config: ClusterConfig) -> None:
    """Run the cluster until SIGTERM or SIGINT (the keeper process's body)."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    state_dir = Path(config.state_dir)
    os.environ.update(FAST_FAILURE_DETECTION)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_name": "head"},
                      shutdown_at_exit=False)
    nodes = []
    for n in config.nodes:
        node_dir = state_dir / "nodes" / n.name
        node_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A trial cluster's nodes go with it: their daemons remove their sandboxes as they stop.
        args = ["--BackendApp.remove_on_stop=True", *n.args]
        env = {"SNAPKERNEL_NODE_STATE_DIR": str(node_dir), "SNAPKERNEL_NODE_ARGS": shlex.join(args)}
        node = cluster.add_node(num_cpus=n.cpus, memory=parse_memory(n.memory), node_name=n.name,
                                resources=node_resources(n.runtimes, {}), env_vars=env,
                                object_store_memory=80 * 1024**2)
        raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        nodes.append({"name": n.name, "state_dir": str(node_dir), "raylet_pid": raylet, "node_id": node.node_id})
    front_log = open(state_dir / "front.log", "ab")  # noqa: SIM115 - the front's, for as long as it runs
    front = subprocess.Popen(
        [sys.executable, "-m", "snapkernel.cli", "backend", "--placement", "ray", "--ray-address", cluster.address,
         "--state-dir", str(state_dir), "--listen", f"unix://{state_dir / 'backend.sock'}", *config.front_args],
        stdin=subprocess.DEVNULL, stdout=front_log, stderr=front_log)
    state = {"keeper_pid": os.getpid(), "address": cluster.address, "front_pid": front.pid, "nodes": nodes,
             "config": asdict(config)}
    (state_dir / STATE).write_text(json.dumps(state, indent=1))
    try:
        stop.wait()
    finally:
        _stop_pid(front.pid, 30.0)
        for started in nodes:
            with contextlib.suppress(OSError, ValueError):
                _stop_pid(int(json.loads((Path(started["state_dir"]) / RECORD).read_text())["pid"]), 60.0)
        cluster.shutdown()  # type: ignore[no-untyped-call]
        (state_dir / STATE).unlink(missing_ok=True)


def _stop_pid(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- up and down ---------------------------------------------------------------------------------------
def up(config: ClusterConfig, timeout: float = UP_TIMEOUT) -> dict[str, Any]:
    """Start the keeper and wait until the front serves; returns what cluster.json says."""
    state_dir = Path(config.state_dir).absolute()
    config.state_dir = str(state_dir)
    if not config.nodes or len(config.nodes) > 64:
        raise InvalidSpecError(f"--nodes {len(config.nodes)} is not valid: use 1 to 64 nodes")
    running = read_state(state_dir)
    if running and _alive(int(running.get("keeper_pid", 0))):
        raise InvalidSpecError(f"a cluster runs in {state_dir} already (keeper pid {running['keeper_pid']}): "
                               f"`snapkernel cluster down --state-dir {state_dir}` stops it")
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (state_dir / STATE).unlink(missing_ok=True)
    (state_dir / "backend.sock").unlink(missing_ok=True)
    log = open(state_dir / "cluster.log", "ab")  # noqa: SIM115 - handed to the keeper
    keeper = subprocess.Popen([sys.executable, "-m", "snapkernel.backend.cluster.local_cluster",
                               json.dumps(asdict(config))],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if keeper.poll() is not None:
            raise BackendUnavailableError(f"the cluster did not start: {_tail(state_dir / 'cluster.log')}")
        state = read_state(state_dir)
        if state and not _alive(int(state["front_pid"])):
            raise BackendUnavailableError(f"the cluster's front stopped: {_tail(state_dir / 'front.log')}")
        if state and (state_dir / "backend.sock").exists() and (state_dir / "token").exists():
            return state
        time.sleep(0.1)
    down(state_dir)
    raise BackendUnavailableError(f"the cluster did not come up within {timeout:g} s; see {state_dir}/cluster.log "
                                  "and front.log")


def down(state_dir: Path, timeout: float = 120.0) -> bool:
    """Stop the cluster of `state_dir`; False when none ran there."""
    state = read_state(state_dir)
    pid = int(state.get("keeper_pid", 0))
    if not pid or not _alive(pid):
        (state_dir / STATE).unlink(missing_ok=True)
        return False
    _stop_pid(pid, timeout)
    return True


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-3000:]
    return ""


if __name__ == "__main__":
    raw = json.loads(sys.argv[1])
    keep(ClusterConfig(raw["state_dir"], [NodeConfig(**n) for n in raw["nodes"]], raw["front_args"]))
