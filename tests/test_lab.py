"""`snapkernel lab`: the embedded backend and JupyterLab with the extension and kernelspecs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from snapkernel.client import BackendClient
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.conftest import Backend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_lab_starts_backend_and_jupyterlab_and_stops_both(tmp_path: Path) -> None:
    port, state = _free_port(), tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPKERNEL_")}
    env["SNAPKERNEL_STATE_DIR"] = str(state)
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapkernel.cli", "lab", "--no-browser", f"--port={port}",
         "--IdentityProvider.token=t0k", f"--ServerApp.root_dir={tmp_path}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                status, body = _get(f"{base}/snapkernel/api/status?token=t0k")
                break
            except OSError:
                assert time.monotonic() < deadline, "JupyterLab did not come up"
                time.sleep(0.3)
        # gvisor wherever runsc works (`make install` installs it as root), else process, said loudly below.
        default = "gvisor" if shutil.which("runsc") else "process"
        assert status == 200 and json.loads(body)["default_runtime"] == default
        assert _get(f"{base}/snapkernel/api/status")[0] == 403
        specs = json.loads(_get(f"{base}/api/kernelspecs?token=t0k")[1])["kernelspecs"]
        assert "snapkernel-python" in specs
        assert (state / "backend.sock").exists()
        assert (state / "token").stat().st_mode & 0o777 == 0o600
        assert state.stat().st_mode & 0o777 == 0o700
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert ("NOT isolated by gVisor" in out) == (default == "process")
    deadline = time.monotonic() + 15
    while (state / "backend.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    backends = [p for p in Path("/proc").glob("[0-9]*") if _cmd(p).count(str(state).encode())]
    assert not backends, "the embedded backend outlived `snapkernel lab`"


def _cmd(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


# --- stopping leaves nothing behind -------------------------------------------------------------------------


# Make stdin (the pty) the controlling terminal of this new session, then become `python ARGS...`.
_WITH_TTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
# A script's background job (`make run &` in a script): no terminal, and SIGINT ignored, across the exec.
_IN_BACKGROUND = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                  "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


class Lab:
    """`snapkernel lab` on a pty of its own (its controlling terminal, as in a terminal emulator), in its own
    session and process group, with a private state dir."""

    def __init__(self, tmp: Path, state: Path, background: bool = False) -> None:
        self.state, self.port, self.token = state, _free_port(), "t0k"
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPKERNEL_")}
        env.update(SNAPKERNEL_STATE_DIR=str(state), TERM="dumb")
        self.master, slave = os.openpty()
        # `background`: as a script's background job (so JupyterLab ignores SIGINT too); its output still goes
        # to the pty, to be read.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _IN_BACKGROUND if background else _WITH_TTY, "-m", "snapkernel.cli", "lab",
             "--no-browser", f"--port={self.port}", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={tmp}"],
            env=env, stdin=subprocess.DEVNULL if background else slave, stdout=slave, stderr=slave,
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):  # EIO once the last process on the pty closed it
            while chunk := os.read(self.master, 65536):
                self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def request(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        req = urllib.request.Request(f"{self.base}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def wait_up(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.text
            try:
                if self.request("GET", "/api/status")[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"JupyterLab did not come up:\n{self.text}"
            time.sleep(0.3)

    def start_kernel(self) -> str:
        """A `snapkernel-python` kernel through Jupyter's own REST API (as JupyterLab starts one); the call
        returns once the provisioner has the sandbox running. Returns the sandbox id."""
        status, kernel = self.request("POST", "/api/kernels", {"name": "snapkernel-python"})
        assert status == 201, kernel
        assert isinstance(kernel, dict)
        status, info = self.request("GET", f"/snapkernel/api/kernels/{kernel['id']}")
        assert status == 200 and isinstance(info, dict) and info["state"] == "running", info
        return str(info["sandbox"]["id"])

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")  # the line discipline sends SIGINT to the foreground process group

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.master)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def leftovers(markers: list[str]) -> list[str]:
    """Command lines of host processes that name one of `markers` (the state dir, sandbox ids): the backend,
    shims, runsc (sandbox, gofer) and kernel processes."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        cmd = _cmd(proc)
        if proc.name != str(os.getpid()) and any(m.encode() in cmd for m in markers):
            found.append(cmd.replace(b"\0", b" ").decode(errors="replace")[:200])
    return found


def kill_leftovers(state: Path) -> None:
    """After a failed test: kill what it left (backends, and shims with their runsc), so no other test pays."""
    for proc in Path("/proc").glob("[0-9]*"):
        cmd = _cmd(proc)
        if str(state).encode() in cmd and proc.name != str(os.getpid()):
            with contextlib.suppress(OSError):
                if b"snapkernel.backend.shim" in cmd:
                    os.killpg(int(proc.name), signal.SIGKILL)  # its group holds `runsc run`
                elif b"snapkernel.cli" in cmd:
                    os.kill(int(proc.name), signal.SIGKILL)


def lab_backend_call(state: Path, fn):  # type: ignore[no-untyped-def]
    """One call to the backend of the lab on this state dir."""
    async def go():  # type: ignore[no-untyped-def]
        client = BackendClient(f"unix://{state / 'backend.sock'}", (state / "token").read_text().strip())
        try:
            return await fn(client)
        finally:
            await client.close()
    return asyncio.run(go())


def listed_sandboxes(state: Path) -> list[pb.Sandbox]:
    """Every sandbox record (ended ones too) a fresh backend of this state dir knows of."""
    backend = Backend(state, runtime="gvisor" if shutil.which("runsc") else "process")
    backend.start()
    try:
        async def call() -> list[pb.Sandbox]:
            client = BackendClient(backend.address, backend.token)
            try:
                return list(await client.list_sandboxes(include_ended=True))
            finally:
                await client.close()
        return asyncio.run(call())
    finally:
        backend.stop()


def _stop(lab: Lab, way: str) -> None:
    pgid = lab.proc.pid
    if way == "ctrl-c":
        lab.ctrl_c()
        deadline = time.monotonic() + 10  # jupyter_server asks first on a tty; a second Ctrl-C within 5 s stops it
        while b"Shut down this Jupyter server" not in lab.output:
            assert time.monotonic() < deadline, f"JupyterLab did not ask:\n{lab.text}"
            time.sleep(0.05)
        lab.ctrl_c()
    elif way == "sigint-group":  # `kill -INT` to a lab started as a script's background job (see Lab)
        os.killpg(pgid, signal.SIGINT)
    elif way == "sigterm-group":
        os.killpg(pgid, signal.SIGTERM)
    elif way == "sigterm-lab":
        os.kill(lab.proc.pid, signal.SIGTERM)
    elif way == "sigkill-lab":  # lab alone: its backend and JupyterLab notice and stop on their own
        os.kill(lab.proc.pid, signal.SIGKILL)
    elif way == "hangup":  # the terminal closing: SIGHUP to the group (as the shell passes it on), pty gone
        os.killpg(pgid, signal.SIGHUP)
        os.close(lab.master)


@pytest.mark.parametrize("way", ["ctrl-c", "sigint-group", "sigterm-group", "sigterm-lab", "hangup", "sigkill-lab"])
def test_stopping_lab_leaves_nothing_behind(tmp_path: Path, way: str) -> None:
    state = tmp_path / "state"
    lab = Lab(tmp_path, state, background=way == "sigint-group")
    try:
        lab.wait_up()
        sandboxes = [lab.start_kernel(), lab.start_kernel()]
        markers = [str(state), f"--port={lab.port}", *sandboxes]  # the port: JupyterLab's command line
        assert len(leftovers(sandboxes)) >= 2  # their shims at least: the check below can see them
        if way == "ctrl-c":  # (once is enough) a second lab on the same state dir must not take them for leftovers
            second = subprocess.run([sys.executable, "-m", "snapkernel.cli", "lab", "--no-browser"], text=True,
                                    env={**os.environ, "SNAPKERNEL_STATE_DIR": str(state)}, capture_output=True,
                                    timeout=60, check=False)
            assert second.returncode == 2 and "another snapkernel lab or backend is serving" in second.stderr
        started = time.monotonic()
        _stop(lab, way)
        lab.proc.wait(40)
        exited = time.monotonic() - started
        deadline = time.monotonic() + 15
        while (left := leftovers(markers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        clean = time.monotonic() - started
        assert not left, f"left running after {way}:\n" + "\n".join(left) + f"\n{lab.text}"
        print(f"{way}: lab exited after {exited:.1f}s, nothing left after {clean:.1f}s")
    finally:
        lab.close()
        kill_leftovers(state)
    assert exited < 30, lab.text
    if way not in ("hangup", "sigkill-lab"):  # (there, the terminal is gone, or the backend stops meanwhile)
        assert "Shutting down 2 kernels" in lab.text, lab.text  # JupyterLab shut them down
    assert listed_sandboxes(state) == []


def test_next_lab_removes_what_a_killed_lab_left(tmp_path: Path) -> None:
    state = tmp_path / "state"
    try:
        _kill_and_restart(tmp_path, state)
    finally:
        kill_leftovers(state)
    assert listed_sandboxes(state) == []


def _kill_and_restart(tmp_path: Path, state: Path) -> None:
    lab = Lab(tmp_path, state)
    try:
        lab.wait_up()
        sandboxes = [lab.start_kernel(), lab.start_kernel()]
        # A user's snapshot of the first, which then hibernates: its sandbox goes, the snapshot stays.
        status, snap = lab.request("POST", "/snapkernel/api/snapshots", {"sandbox_id": sandboxes[0], "kind": "state"})
        assert status == 201 and isinstance(snap, dict), snap
        asleep = lab_backend_call(state, lambda c: c.hibernate_sandbox(sandboxes[0]))
        assert asleep.state == pb.HIBERNATED, asleep
        # Power loss, or SIGKILL of everything: the backend (in its own session) too; the shims live on.
        backends = [int(p.name) for p in Path("/proc").glob("[0-9]*")
                    if b"snapkernel.cli\0backend" in _cmd(p) and str(state).encode() in _cmd(p)]
        assert backends
        for pid in backends:
            os.kill(pid, signal.SIGKILL)
        os.killpg(lab.proc.pid, signal.SIGKILL)
        lab.proc.wait(10)
        assert len(leftovers(sandboxes)) >= 2
    finally:
        lab.close()
    again = Lab(tmp_path, state)
    try:
        again.wait_up()
        assert "snapkernel: removed 2 sandboxes left by an earlier lab that did not stop cleanly" in again.text
        assert leftovers(sandboxes) == []
        assert not any((state / "sandboxes" / sb).exists() for sb in sandboxes)
        status, snaps = again.request("GET", "/snapkernel/api/snapshots")
        assert status == 200 and [s["id"] for s in snaps] == [snap["id"]], snaps  # type: ignore[index]
        os.killpg(again.proc.pid, signal.SIGTERM)
        again.proc.wait(40)
    finally:
        again.close()
    assert leftovers([str(state)]) == []
