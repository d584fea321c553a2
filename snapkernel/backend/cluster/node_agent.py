"""The node daemon and its keeper: on every Ray node, the ordinary backend daemon, kept alive by a Ray actor.

`NodeAgent` is a detached, named actor (`snapkernel:node:<ray node id>`) pinned to its node. It starts
`snapkernel backend` listening on the node's address, detached from the actor's worker process (a Ray worker
kills its children when it exits, and the daemon's sandboxes must outlive any one worker), restarts it when it
dies (the new daemon re-adopts its sandboxes) and tells the front where it is and its token.

A node's settings come from its raylet's environment, so `ray start` on a host sets them:
`SNAPKERNEL_NODE_STATE_DIR` (default: `node` in the default state dir) and `SNAPKERNEL_NODE_ARGS` (more
`snapkernel backend` arguments, shell-quoted, e.g. `--BackendApp.runtime=process`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from snapkernel.errors import BackendUnavailableError
from snapkernel.protocol.connection import default_state_dir, read_token, token_path

log = logging.getLogger(__name__)

NAMESPACE = "snapkernel"
AGENT_PREFIX = "snapkernel:node:"
RECORD = "daemon.json"  # in the node's state dir: the daemon's pid and address, for the next keeper
START_TIMEOUT = 60.0
KEEP_INTERVAL = 1.0
# Variables of Ray's worker process that must not reach the daemon and its kernels: Ray's own, and the GPU
# mask Ray gives a zero-GPU actor (the daemon hands out GPUs itself, as Ray leases them).
_DROPPED_ENV = ("RAY_", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "OMP_NUM_THREADS")

# Run by a short-lived child: starts the daemon in a session of its own and exits, so the daemon is nobody's
# child that Ray would kill.
_DETACH = """
import json, subprocess, sys
cmd, log = json.loads(sys.argv[1]), sys.argv[2]
with open(log, "ab") as out:
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                         close_fds=True)
print(p.pid)
"""


def agent_name(node_id: str) -> str:
    return AGENT_PREFIX + node_id


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"snapkernel" in cmdline and b"backend" in cmdline  # not a recycled pid of something else


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def last_wins(args: list[str]) -> list[str]:
    """`--Name=value` settings given twice (the node's own, then the front's) once, the later value: traitlets
    refuses a scalar setting given twice."""
    latest = {a.partition("=")[0]: i for i, a in enumerate(args) if a.startswith("--") and "=" in a}
    return [a for i, a in enumerate(args) if not (a.startswith("--") and "=" in a) or latest[a.partition("=")[0]] == i]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NodeDaemon:
    """The `snapkernel backend` process of one node: found again from its record, or started detached."""

    def __init__(self, state_dir: Path, host: str, args: list[str]) -> None:
        self.state_dir, self.host, self.args = state_dir, host, args
        self.record = state_dir / RECORD
        self.pid = 0
        self.address = ""
        self.lock = threading.Lock()

    def _recorded(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            found: dict[str, Any] = json.loads(self.record.read_text())
            return found
        return {}

    def ensure(self) -> None:
        """The daemon runs and answers: the recorded one if it still does (a new keeper after a restart of
        the actor), else a new one, which re-adopts the sandboxes the last one left."""
        with self.lock:
            rec = self._recorded()
            pid, address = int(rec.get("pid", 0)), str(rec.get("address", ""))
            if pid and _alive(pid) and address and _answers(address):
                self.pid, self.address = pid, address
                return
            if pid and _alive(pid):  # alive but deaf: hung, or still starting after a crash of the keeper
                if self._wait(pid, address, 10.0):
                    self.pid, self.address = pid, address
                    return
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self._start(int(address.rpartition(":")[2]) if address else 0)

    def _start(self, port: int) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not port or _answers(f"{self.host}:{port}"):
            port = _free_port(self.host)
        address = f"{self.host}:{port}"
        cmd = [sys.executable, "-m", "snapkernel.cli", "backend", "--listen", address,
               "--state-dir", str(self.state_dir), *self.args]
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
        out = subprocess.run([sys.executable, "-c", _DETACH, json.dumps(cmd), str(self.state_dir / "daemon.log")],
                             env=env, capture_output=True, text=True, check=True, timeout=30)
        pid = int(out.stdout.strip())
        self.record.write_text(json.dumps({"pid": pid, "address": address, "started": time.time()}))
        if not self._wait(pid, address, START_TIMEOUT):
            tail = (self.state_dir / "daemon.log").read_text(errors="replace")[-2000:]
            how = "stopped" if not _alive(pid) else f"did not serve within {START_TIMEOUT:g} s"
            raise BackendUnavailableError(f"the node's backend daemon ({shlex.join(cmd)}) {how}; its log ends:\n"
                                          f"{tail}")
        self.pid, self.address = pid, address
        log.info("node daemon pid %s serving on %s", pid, address)

    def _wait(self, pid: int, address: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                return False
            if token_path(self.state_dir).exists() and _answers(address):
                return True
            time.sleep(0.05)
        return False

    def token(self) -> str:
        return read_token(token_path(self.state_dir))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the daemon stops, leaving its sandboxes for the next one (or `remove_on_stop`)."""
        pid = self.pid or int(self._recorded().get("pid", 0))
        if not pid or not _alive(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


class NodeAgent:
    """The Ray actor (wrapped by `ray.remote` where it is created): keeps its node's daemon alive."""

    def __init__(self, extra_args: list[str], front_address: str = "", front_token: str = "") -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        self.state_dir = Path(os.environ.get("SNAPKERNEL_NODE_STATE_DIR") or default_state_dir() / "node")
        args = [*shlex.split(os.environ.get("SNAPKERNEL_NODE_ARGS", "")), *extra_args]
        if front_address:  # the kernels' fan-out jobs go to the front, which spreads them over the nodes
            token_file = self.state_dir.absolute() / "front-token"
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(front_token + "\n")
            args += [f"--BackendApp.fanout_upstream={front_address}",
                     f"--BackendApp.fanout_upstream_token_file={token_file}"]
        self.daemon = NodeDaemon(self.state_dir.absolute(), self.host, last_wins(args))
        self.daemon.ensure()
        self._stopping = False
        threading.Thread(target=self._keep, name="snapkernel-keeper", daemon=True).start()

    def _keep(self) -> None:
        while not self._stopping:
            time.sleep(KEEP_INTERVAL)
            try:
                if not self._stopping and not _alive(self.daemon.pid):
                    log.warning("node daemon pid %s is gone: starting another", self.daemon.pid)
                    self.daemon.ensure()
            except Exception:  # the keeper keeps trying; the front sees the node unreachable meanwhile
                log.exception("restarting the node daemon failed")

    def info(self) -> dict[str, Any]:
        """Where the daemon serves and its token (the front calls it with these)."""
        self.daemon.ensure()
        return {"node_id": self.node_id, "address": self.daemon.address, "token": self.daemon.token(),
                "pid": self.daemon.pid, "state_dir": str(self.state_dir)}

    def stop_daemon(self) -> None:
        """`snapkernel cluster down`: the daemon stops (sandboxes stay for a later daemon, or are removed by
        its `remove_on_stop`); the keeper stops restarting it."""
        self._stopping = True
        self.daemon.stop()
