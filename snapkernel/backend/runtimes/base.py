"""What every runtime does: start a sandbox's entry point under a shim, stop it, tell if it lives; and what
it can do beyond that (`RuntimeCapabilities`), which the backend asks instead of recognising a runtime by
its type or name.

Runtimes are found through the entry-point group `snapkernel.runtimes` (`RUNTIME_GROUP`), the way
jupyter_client finds kernel provisioners; each builds itself from the backend's settings (`from_settings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.errors import StateError
from snapkernel.protocol import hops
from snapkernel.protocol.spec import ParsedSpec

LINK_SOCKET = "link.sock"
EXIT_FILE = "exit.json"
LOG_FILE = "sandbox.log"
STOP_GRACE = 3.0
SELF_EXIT_WAIT = 5.0  # seconds a sandbox whose memory image is written (no --leave-running) has to end on its own


@dataclass
class RuntimeInfo:
    name: str
    available: bool
    version: str = ""
    detail: str = ""


@dataclass
class Launch:
    """What a runtime decided for one sandbox: the entry point, its environment and limits."""

    argv: list[str]
    env: dict[str, str]
    limits: dict[str, Any]
    limits_mode: str
    cwd: str = ""  # default: the sandbox's workspace


# Processes and threads a sandbox may hold at once (`--BackendApp.pids_limit`): enough for a kernel whose
# libraries start a thread pool per core on a large host, and a fork bomb stops with EAGAIN from `fork`.
DEFAULT_PIDS_LIMIT = 1024


@dataclass(frozen=True)
class RuntimeCapabilities:
    """What a runtime can do with its sandboxes here (per instance: gvisor's depend on the installed runsc)."""

    checkpoint: bool = False  # writes a running sandbox's memory image (`checkpoint`, `save_bundle`)
    live_checkpoint: bool = False  # ... of a live ipykernel, with this build (else hibernation saves the state)
    restore: bool = False  # resumes a memory image in a new sandbox (`prepare_restore`)
    gpu_checkpoint: bool = False  # GPU memory goes into its memory images
    gpu_suspend: bool = False  # a GPU kernel's host process can be suspended in place (CUDA driver checkpoint)
    clone: bool = False  # fan-out --clone: workers restored from a live memory snapshot of their kernel
    disk_quota: bool = False  # its sandboxes write to their workspace, which the `disk` quota bounds
    version: str = ""  # recorded with its memory snapshots: a restore needs the same

    @property
    def memory_snapshots(self) -> bool:
        """Memory snapshots at all (taken and restored); whether of a GPU sandbox is `gpu_checkpoint`."""
        return self.checkpoint and self.restore


@dataclass(frozen=True)
class RuntimeSettings:
    """The backend's settings a runtime builds itself from (`SandboxRuntime.from_settings`); each runtime
    takes what applies to it."""

    state_dir: Path
    driver_version: str = ""  # the host's NVIDIA driver ("" = none)
    pids_limit: int = DEFAULT_PIDS_LIMIT
    runsc: str = ""  # gvisor: the runsc binary ("" = `runsc` on PATH)
    platform: str = ""  # gvisor: the platform ("" = its default per sandbox)
    sandbox_uid: int = 1000  # gvisor: the unprivileged user kernels run as
    sandbox_gid: int = 1000
    ro_paths: tuple[str, ...] = ()  # gvisor: more read-only host paths


class RuntimeUnusable(Exception):
    """`from_settings` cannot build the runtime here; `info` says why, for `snapkernel status`."""

    def __init__(self, info: RuntimeInfo) -> None:
        super().__init__(info.detail)
        self.info = info


# The entry-point group runtimes are found through: name = "module:SandboxRuntime subclass".
RUNTIME_GROUP = "snapkernel.runtimes"
# This package's own entries in that group (pyproject.toml), for a source tree run without being installed.
BUILTIN_RUNTIMES = {
    "process": "snapkernel.backend.runtimes.process:ProcessRuntime",
    "gvisor": "snapkernel.backend.runtimes.gvisor:GvisorRuntime",
}


class SandboxRuntime(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: RuntimeSettings) -> Self:
        """This runtime, built from the backend's settings; raises `RuntimeUnusable` where it cannot run here."""

    @property
    def capabilities(self) -> RuntimeCapabilities:
        """What this runtime can do here beyond running sandboxes (by default: nothing more)."""
        return RuntimeCapabilities()

    @abstractmethod
    def probe(self) -> RuntimeInfo:
        """Whether this runtime works on this host, its version, and what it supports."""

    def image_settings(self) -> str:
        """What of this runtime's settings its memory images carry (its mounts, user, limits): a template taken
        under other settings is not used (templates.py)."""
        return self.capabilities.version

    def check(self, spec: ParsedSpec) -> None:  # noqa: B027 - most runtimes run any spec
        """Refuse at once a spec this runtime cannot run here (raises a `SnapkernelError`)."""

    @abstractmethod
    def prepare(self, record: SandboxRecord, spec: ParsedSpec, env: dict[str, str]) -> Launch:
        """The sandbox's entry point and limits (the agent is the entry point's stdio peer)."""

    def prepare_restore(self, record: SandboxRecord, spec: ParsedSpec, snapshot_dir: Path) -> Launch:
        """The entry point that resumes a memory snapshot in this sandbox (`capabilities.restore`), with the limits
        of `spec` (a move or a resume may give it more memory or CPU than the image had)."""
        raise StateError(f"the {self.name} runtime cannot restore memory snapshots; use a state snapshot")

    async def checkpoint(self, record: SandboxRecord, image_dir: Path, leave_running: bool = True) -> None:
        """Write the running sandbox's memory image to `image_dir` (`capabilities.checkpoint`); it keeps running
        unless `leave_running` is false."""
        raise StateError(f"the {self.name} runtime cannot checkpoint a sandbox's memory; use a state snapshot")

    def save_bundle(self, record: SandboxRecord, snapshot_dir: Path) -> None:
        """Keep beside a memory image what a restore needs besides it (`capabilities.checkpoint`)."""
        raise StateError(f"the {self.name} runtime cannot checkpoint a sandbox's memory; use a state snapshot")

    async def launch(self, record: SandboxRecord, spec: ParsedSpec, env: dict[str, str],
                     restore: Path | None = None) -> str:
        """Start the shim that runs the entry point (or resumes the memory snapshot in `restore`);
        sets `record.pid`; returns how limits are applied."""
        sandbox_dir = Path(record.dir)
        (sandbox_dir / "workspace").mkdir(parents=True, exist_ok=True)
        plan = self.prepare_restore(record, spec, restore) if restore else self.prepare(record, spec, env)
        argv = [
            sys.executable, "-m", "snapkernel.backend.shim",
            "--socket", str(sandbox_dir / LINK_SOCKET),
            "--exit-file", str(sandbox_dir / EXIT_FILE),
            "--limits", json.dumps(plan.limits),
            "--sandbox-id", record.id,
            "--", *plan.argv,
        ]
        shim_env = {**plan.env, hops.ENV: "1"} if hops.ENABLED else plan.env  # profiling: the shim marks too
        # A plain Popen, not asyncio's: asyncio kills the children it still tracks when its loop closes,
        # and sandboxes must outlive the backend.
        with open(sandbox_dir / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=plan.cwd or sandbox_dir / "workspace", env=shim_env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )
        self._children[record.id] = proc
        record.pid = proc.pid
        # Until the child has exec'd, /proc shows the backend's command line and `is_alive` would say no.
        for _ in range(400):
            if proc.poll() is not None or self.is_alive(record):
                break
            await asyncio.sleep(0.005)
        return plan.limits_mode

    def is_alive(self, record: SandboxRecord) -> bool:
        """The sandbox's shim still runs (checked by pid and command line, against pid reuse)."""
        if record.pid <= 0:
            return False
        try:
            with open(f"/proc/{record.pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            return False
        return b"snapkernel.backend.shim" in cmdline and record.id.encode() in cmdline

    async def stop(self, record: SandboxRecord) -> None:
        """Stop the whole sandbox: SIGTERM to its process group, SIGKILL after a grace period."""
        if self.is_alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGTERM)
            for _ in range(int(STOP_GRACE / 0.05)):
                if not self.is_alive(record) or await self.reap(record, timeout=0.05) is not None:
                    break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(record.pid, signal.SIGKILL)
        await self.reap(record, timeout=1.0)
        await asyncio.to_thread(self.cleanup, record)

    def checkpointing(self, record: SandboxRecord) -> bool:
        """Whether the sandbox's memory image is being written now (by an earlier backend, say)."""
        return False

    async def ended(self, record: SandboxRecord, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the sandbox to end on its own; whether it did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.is_alive(record) and await self.reap(record, timeout=0.01) is None:
            if loop.time() >= deadline:
                return False
        return True

    async def reap(self, record: SandboxRecord, timeout: float) -> int | None:
        """Collect the shim's exit status if this backend started it (avoids zombies)."""
        proc = self._children.get(record.id)
        if proc is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (code := proc.poll()) is None:
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.02)
        self._children.pop(record.id, None)
        return code

    def owner(self, spec: ParsedSpec) -> tuple[int, int] | None:
        """The (uid, gid) a sandbox's kernel runs as where it is not the backend's own: its workspace is theirs."""
        return None

    def memory_used(self, record: SandboxRecord) -> int | None:
        """The sandbox's memory as the runtime accounts it, where its processes' RSS does not show it (None:
        their RSS is right). Blocking."""
        return None

    def set_memory_limit(self, record: SandboxRecord, nbytes: int) -> None:  # noqa: B027 - where it has one
        """Change a running sandbox's memory limit (a suspended GPU kernel keeps its GPU memory in host memory)."""

    def set_cpu_limit(self, record: SandboxRecord, cores: float | None) -> None:  # noqa: B027 - where it has one
        """Change a running sandbox's CPU limit; None lifts it (for the second a hibernating GPU kernel copies
        its tensors out or back: it runs nothing else meanwhile, and the copies need many cores)."""

    def cleanup(self, record: SandboxRecord) -> None:  # noqa: B027 - most runtimes hold nothing
        """Release what the runtime holds for a stopped sandbox (cgroups, mounts)."""
