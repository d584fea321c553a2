"""`snapkernel lab`: an embedded backend (unix socket in the state dir) and JupyterLab in front of it.

Stopping it any usual way leaves nothing behind. The order matters: JupyterLab shuts its kernels down through
the provisioner, which deletes their sandboxes through the backend, so the backend must outlive JupyterLab.
It therefore runs in a session of its own (a terminal's Ctrl-C or hang-up, or a signal to the process group,
never reaches it) and is stopped only once JupyterLab has exited; on that stop it removes whatever sandbox
is still there (`remove_on_stop`). Its stdin is a pipe from this process, so it stops the same way if this
process dies (and JupyterLab gets SIGTERM then too); a lab killed outright (SIGKILL to everything, power
loss) leaves sandboxes that the next lab on the state dir removes at start (`remove_leftovers`: JupyterLab
kernels do not survive a server restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from snapkernel.errors import BackendUnavailableError, SnapkernelError, StateError
from snapkernel.protocol.connection import default_state_dir
from snapkernel.protocol.v1 import backend_pb2 as pb

READY_TIMEOUT = 60.0  # the backend's start, removing what an earlier lab left included
LAB_STOP_TIMEOUT = 20.0  # seconds JupyterLab may take to shut its kernels down and exit, then it is killed
BACKEND_STOP_TIMEOUT = 60.0  # seconds the backend may take to remove what is left, then it is killed
FORWARD_GRACE = 0.5  # seconds JupyterLab has to show it got a SIGTERM of its own (see LabStopper)
SIGINT_GRACE = 2.0  # the same for a SIGINT without a tty
CONFIRM_WINDOW = 5.0  # jupyter_server stops at once on a second Ctrl-C within this many seconds
READY_LINE = b"snapkernel backend serving on "
LAB_BACKEND_ARGS = ["--BackendApp.remove_leftovers=True", "--BackendApp.remove_on_stop=True",
                    "--BackendApp.stop_on_stdin_eof=True"]


def start_backend(state_dir: Path, extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start `snapkernel backend` on a unix socket in `state_dir`; returns (process, address) once it serves.

    Lines it prints before serving that start with `snapkernel:` are shown on this terminal."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = state_dir / "backend.sock"
    address = f"unix://{sock.absolute()}"
    if _serving(sock):  # ours would take its sandboxes for leftovers and remove them
        raise StateError(f"another snapkernel lab or backend is serving on {sock}: stop it first, or give this "
                         "one a state dir of its own (SNAPKERNEL_STATE_DIR)")
    log = open(state_dir / "backend.log", "ab")  # noqa: SIM115 - lives as long as the backend
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapkernel.cli", "backend", "--listen", address, "--state-dir", str(state_dir),
         *LAB_BACKEND_ARGS, *(extra or [])],
        stdout=subprocess.PIPE, stderr=log, stdin=subprocess.PIPE, start_new_session=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT
    buffered, serving = b"", False
    while not serving:
        left = deadline - time.monotonic()
        ready = select.select([proc.stdout], [], [], max(0.0, left))[0] if left > 0 else []
        chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
        if not chunk:
            proc.kill()
            proc.wait()
            raise BackendUnavailableError(
                f"the embedded backend did not start (exit code {proc.poll()}); see {state_dir / 'backend.log'}"
            )
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            log.write(line + b"\n")
            serving = serving or line.startswith(READY_LINE)
            if line.startswith(b"snapkernel:"):
                print(line.decode(errors="replace"), flush=True)
    log.write(buffered)
    log.flush()
    # Whatever it prints later goes to its log; a thread copies it (the pipe must never fill up).
    threading.Thread(target=_copy, args=(proc.stdout, log), daemon=True).start()
    return proc, address


def _serving(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:  # no socket, or a stale one
            return False
    return True


def _copy(src: IO[bytes], dst: IO[bytes]) -> None:
    with contextlib.suppress(OSError, ValueError):
        while chunk := os.read(src.fileno(), 65536):
            dst.write(chunk)
            dst.flush()


def stop_backend(backend: subprocess.Popen[bytes]) -> None:
    """SIGTERM (it removes the sandboxes still there), SIGKILL if it takes too long; the next lab removes
    what a killed one left."""
    if backend.poll() is None:
        backend.terminate()
    try:
        backend.wait(BACKEND_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        backend.kill()
        backend.wait()
    if backend.stdin is not None:
        with contextlib.suppress(OSError):
            backend.stdin.close()


class LabStopper:
    """Signal handling for JupyterLab's process, which shares our process group.

    - SIGHUP: JupyterLab is started with it ignored (jupyter_server has no handler for it and would die at
      once, its kernels left) and gets SIGTERM, its clean stop, instead.
    - SIGTERM: to the group, JupyterLab got it too; to us alone, it did not. Which one is told apart by
      jupyter_server's info file (`jpserver-PID.json`), the first thing its clean stop removes: if it is
      still there after a moment, JupyterLab gets SIGTERM from us (twice would run its shutdown twice).
    - SIGINT: a terminal's Ctrl-C reaches JupyterLab too, which asks for confirmation on a tty and stops on
      a second Ctrl-C (or at once without a tty); it decides. Only without a tty, where it is not stopping
      SIGINT_GRACE seconds after (started with SIGINT ignored, as a script's background job is), it gets
      SIGTERM, as above.
    Once JupyterLab is stopping it has LAB_STOP_TIMEOUT seconds to exit before it is killed.
    """

    def __init__(self, lab: subprocess.Popen[bytes], tty: bool) -> None:
        from jupyter_core.paths import jupyter_runtime_dir

        self.lab = lab
        self.tty = tty
        self.info_file = Path(jupyter_runtime_dir()) / f"jpserver-{lab.pid}.json"
        self.deadline: float | None = None
        self.forward_at: float | None = None  # when to send JupyterLab SIGTERM unless it is stopping already
        self.last_sigint = -CONFIRM_WINDOW - 1

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_stop)
        signal.signal(signal.SIGINT, self._on_sigint)

    def _arm(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + LAB_STOP_TIMEOUT

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._arm()
        if self.forward_at is None:
            serving = signum == signal.SIGTERM and self.info_file.exists()
            self.forward_at = time.monotonic() + (FORWARD_GRACE if serving else 0.0)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if not self.tty or now - self.last_sigint <= CONFIRM_WINDOW:
            self._arm()
            if not self.tty and self.forward_at is None:
                self.forward_at = now + SIGINT_GRACE
        self.last_sigint = now

    def wait(self) -> int:
        while True:
            try:
                return self.lab.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self.forward_at is not None and now >= self.forward_at:
                self.forward_at = float("inf")  # once
                if self.info_file.exists():  # not stopping on its own
                    with contextlib.suppress(ProcessLookupError):
                        self.lab.send_signal(signal.SIGTERM)
            if self.deadline is not None and now > self.deadline:
                _say(f"snapkernel: JupyterLab did not exit within {LAB_STOP_TIMEOUT:g}s; killing it")
                self.lab.kill()
                return self.lab.wait()


def _say(text: str) -> None:
    with contextlib.suppress(OSError):  # the terminal may be gone (a hang-up)
        print(text, file=sys.stderr, flush=True)


# JupyterLab gets SIGTERM if this process dies (SIGKILL): Linux's parent-death signal, set before it starts
# (and survives the exec); if this process is gone already, it does not start at all.
_BOOT_LAB = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "  # 1: PR_SET_PDEATHSIG
             "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
             "os.execv(sys.executable, [sys.executable, '-m', 'jupyterlab', *sys.argv[2:]])")


def _start_lab(argv: list[str]) -> subprocess.Popen[bytes]:
    """JupyterLab with SIGHUP ignored (the disposition survives exec; see LabStopper)."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return subprocess.Popen([sys.executable, "-c", _BOOT_LAB, str(os.getpid()), *argv])
    finally:
        signal.signal(signal.SIGHUP, previous)


def main(argv: list[str]) -> int:
    from snapkernel.client import BackendClient
    from snapkernel.kernel_provisioner import kernelspec

    state_dir = default_state_dir().absolute()
    try:
        backend, address = start_backend(state_dir)
    except SnapkernelError as e:
        print(f"snapkernel: error ({e.reason}): {e}", file=sys.stderr)  # the reason REST gives too
        return 2
    os.environ["SNAPKERNEL_BACKEND"] = address
    os.environ["SNAPKERNEL_STATE_DIR"] = str(state_dir)

    async def status() -> pb.Status:
        client = BackendClient(address)
        try:
            return await client.status()
        finally:
            await client.close()

    # Until JupyterLab runs, a stop signal simply ends this process; the `finally` stops the backend.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        st = asyncio.run(status())
        models: dict[str, int] = {}
        for g in st.gpus:
            models[g.model] = models.get(g.model, 0) + 1
        for name, _ in kernelspec.install(models):
            print(f"snapkernel: kernel {name} installed")
        if st.default_runtime == "process":
            bar = "!" * 78
            print(f"{bar}\nsnapkernel: kernels run with the `process` runtime: plain processes, NOT isolated "
                  f"by gVisor.\n{bar}", file=sys.stderr)
        print(f"snapkernel: backend on {address} (log: {state_dir / 'backend.log'})", flush=True)
        if os.geteuid() == 0 and "--allow-root" not in argv:
            argv = [*argv, "--allow-root"]  # `make run` as root on a fresh machine is a supported set-up
        lab = _start_lab(argv)
        stopper = LabStopper(lab, tty=sys.stdin is not None and sys.stdin.isatty())
        stopper.install()
        code = stopper.wait()
        return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention
    except KeyboardInterrupt:
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the backend's stop is not cut short
            signal.signal(sig, signal.SIG_IGN)
        stop_backend(backend)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

