"""Shared fixtures: a real backend daemon in a subprocess, and the snapkernel kernelspecs on JUPYTER_PATH."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapkernel.kernel_provisioner.kernelspec import install

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytest_jupyter.jupyter_server"]


class Backend:
    """A `snapkernel backend` process on a unix socket in its own state dir; can be restarted."""

    def __init__(self, state_dir: Path, runtime: str = "process", args: list[str] | None = None) -> None:
        self.state_dir = state_dir
        # More `snapkernel backend` arguments, e.g. settings. The suite runs many sandboxes at once whose memory
        # limit (the 4Gi default) is far above what they use, on CI machines of unknown memory: the test
        # backends overcommit memory (the product's default is not to), unless a test sets it itself.
        self.args = args or []
        if not any("memory_overcommit" in a for a in self.args):
            self.args.append("--BackendApp.memory_overcommit=2")
        # Kernels boot, as they did before templates, unless a test is about templates: a template's build in
        # the background would change what the other tests count and time.
        if not any("BackendApp.templates" in a for a in self.args):
            self.args.append("--BackendApp.templates=False")
        self.address = f"unix://{state_dir / 'backend.sock'}"
        self.runtime = runtime
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def start(self) -> None:
        sock = self.state_dir / "backend.sock"
        sock.unlink(missing_ok=True)
        self.log = open(self.state_dir / "backend.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "snapkernel.cli", "backend", "--listen", self.address,
             "--state-dir", str(self.state_dir), "--runtime", self.runtime, *self.args],
            stdout=self.log, stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert self.proc.poll() is None, f"backend exited: {self.read_log()}"
            assert time.monotonic() < deadline, f"backend did not start: {self.read_log()}"
            time.sleep(0.02)
        self.token = (self.state_dir / "token").read_text().strip()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def read_log(self) -> str:
        return (self.state_dir / "backend.log").read_text(errors="replace")[-6000:]

    def report(self) -> None:
        """Print the backend's and sandboxes' logs: pytest shows them for failed tests only."""
        print(f"--- backend log ({self.state_dir}) ---\n{self.read_log()}")
        for log in sorted(self.state_dir.glob("sandboxes/*/sandbox.log")):
            print(f"--- {log} ---\n{log.read_text(errors='replace')[-3000:]}")

    def env(self) -> dict[str, str]:
        return {"SNAPKERNEL_BACKEND": self.address, "SNAPKERNEL_TOKEN": self.token}


def sandbox_processes(marker: str) -> list[int]:
    """Host pids whose command line names `marker` (a sandbox id or a state dir)."""
    pids = []
    for pid_dir in Path("/proc").iterdir():
        if pid_dir.name.isdigit() and pid_dir.name != str(os.getpid()):
            try:
                if marker.encode() in (pid_dir / "cmdline").read_bytes():
                    pids.append(int(pid_dir.name))
            except OSError:
                continue
    return pids


def _cleanup_sandboxes(backend: Backend) -> None:
    """Kill whatever sandbox processes a test left behind (they run in their own process groups)."""
    for pid in sandbox_processes(str(backend.state_dir)):
        with contextlib.suppress(OSError):
            if b"snapkernel.backend.shim" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signal.SIGKILL)
    # Their workspaces are loop mounts (the disk quota): unmounted, so the state dir can be removed.
    for line in Path("/proc/mounts").read_text().splitlines():
        point = line.split()[1]
        if point.startswith(f"{backend.state_dir}/"):
            subprocess.run(["umount", "--lazy", point], check=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests run only where NVML lists a GPU; `gvisor` tests only where runsc is installed."""
    import shutil

    from snapkernel.host.gpus import inventory

    gpus, _, why = inventory()
    for item in items:
        if "gpu" in item.keywords and not gpus:
            item.add_marker(pytest.mark.skip(reason=f"needs an NVIDIA GPU: {why}"))
        if "gvisor" in item.keywords and not shutil.which("runsc"):
            item.add_marker(pytest.mark.skip(reason="needs runsc (gVisor)"))


@pytest.fixture(scope="session")
def kernelspec_dir() -> Iterator[Path]:
    """snapkernel kernelspecs installed in a private prefix, first on JUPYTER_PATH."""
    with tempfile.TemporaryDirectory(prefix="snapkernel-specs-") as tmp:
        install({}, prefix=tmp)
        data = Path(tmp) / "share" / "jupyter"
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(data), old]))
        yield data
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


# Every kernel test runs once per runtime; gvisor ones skip where runsc is missing.
RUNTIMES = [pytest.param("process"), pytest.param("gvisor", marks=pytest.mark.gvisor)]


@pytest.fixture(scope="session", params=RUNTIMES)
def backend(request: pytest.FixtureRequest, kernelspec_dir: Path) -> Iterator[Backend]:
    """One backend per runtime for the session; its address and token are in the environment."""
    with serving_backend(request.param) as b:
        yield b


@contextlib.contextmanager
def serving_backend(runtime: str, args: list[str] | None = None) -> Iterator[Backend]:
    """A backend in a temporary state dir, its address and token in the environment until it stops."""
    with tempfile.TemporaryDirectory(prefix="snapkernel-test-") as tmp:
        b = Backend(Path(tmp), runtime=runtime, args=args)
        b.start()
        saved = {k: os.environ.get(k) for k in b.env()}
        os.environ.update(b.env())
        try:
            yield b
        finally:  # also when the code using it raises: no backend or sandbox outlives the tests
            b.stop()
            b.report()
            _cleanup_sandboxes(b)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextlib.contextmanager
def backend_of_its_own(runtime: str, monkeypatch: pytest.MonkeyPatch, prefix: str = "snapkernel-own-",
                       args: list[str] | None = None) -> Iterator[Backend]:
    """A backend in a temporary state dir, in the environment while it runs; stopped and cleaned up after."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        b = Backend(Path(tmp), runtime=runtime, args=args)
        b.start()
        for k, v in b.env().items():
            monkeypatch.setenv(k, v)
        try:
            yield b
        finally:
            b.stop()
            b.report()
            _cleanup_sandboxes(b)


@pytest.fixture(params=RUNTIMES)
def own_backend(request: pytest.FixtureRequest, kernelspec_dir: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """A backend of this test's own (for restarts), in the environment while the test runs."""
    with backend_of_its_own(request.param, monkeypatch) as b:
        yield b
