"""`snapkernel lab`: an embedded backend (unix socket in the state dir) and JupyterLab in front of it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from snapkernel.backend.server import default_state_dir
from snapkernel.backend.v1 import backend_pb2 as pb
from snapkernel.errors import BackendUnavailableError, SnapkernelError

READY_TIMEOUT = 30.0


def start_backend(state_dir: Path, extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start `snapkernel backend` on a unix socket in `state_dir`; returns (process, address) once it serves."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock = state_dir / "backend.sock"
    address = f"unix://{sock.absolute()}"
    log = open(state_dir / "backend.log", "ab")  # noqa: SIM115 - lives as long as the backend
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapkernel.cli", "backend", "--listen", address, "--state-dir", str(state_dir),
         *(extra or [])],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    while not (sock.exists() and (state_dir / "token").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise BackendUnavailableError(
                f"the embedded backend did not start (exit code {proc.poll()}); see {state_dir / 'backend.log'}"
            )
        time.sleep(0.05)
    return proc, address


def main(argv: list[str]) -> int:
    from snapkernel.backend.client import BackendClient
    from snapkernel.kernel_provisioner import kernelspec

    state_dir = default_state_dir().absolute()
    try:
        backend, address = start_backend(state_dir)
    except SnapkernelError as e:
        print(f"snapkernel: error: {e}", file=sys.stderr)
        return 2
    os.environ["SNAPKERNEL_BACKEND"] = address
    os.environ["SNAPKERNEL_STATE_DIR"] = str(state_dir)

    async def status() -> pb.Status:
        client = BackendClient(address)
        try:
            return await client.status()
        finally:
            await client.close()

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
        print(f"snapkernel: backend on {address} (log: {state_dir / 'backend.log'})")
        if os.geteuid() == 0 and "--allow-root" not in argv:
            argv = [*argv, "--allow-root"]  # `make run` as root on a fresh machine is a supported set-up
        lab = subprocess.Popen([sys.executable, "-m", "jupyterlab", *argv])
        # SIGTERM ends JupyterLab first; the backend is stopped below, never left behind.
        signal.signal(signal.SIGTERM, lambda *_: lab.terminate())
        try:
            return lab.wait()
        except KeyboardInterrupt:
            lab.send_signal(signal.SIGINT)
            return lab.wait()
    finally:
        backend.terminate()
        try:
            backend.wait(10)
        except subprocess.TimeoutExpired:
            backend.kill()
