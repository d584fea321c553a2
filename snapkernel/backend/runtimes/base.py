"""What every runtime does: start a sandbox's entry point under a shim, stop it, tell if it lives."""

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
from typing import Any, ClassVar

from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.errors import StateError
from snapkernel.protocol.spec import ParsedSpec

LINK_SOCKET = "link.sock"
EXIT_FILE = "exit.json"
LOG_FILE = "sandbox.log"
STOP_GRACE = 3.0


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


class SandboxRuntime(ABC):
    name: ClassVar[str]

    def __init__(self) -> None:
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @abstractmethod
    def probe(self) -> RuntimeInfo:
        """Whether this runtime works on this host, its version, and what it supports."""

    def check(self, spec: ParsedSpec) -> None:  # noqa: B027 - most runtimes run any spec
        """Refuse at once a spec this runtime cannot run here (raises a `SnapkernelError`)."""

    @abstractmethod
    def prepare(self, record: SandboxRecord, spec: ParsedSpec, env: dict[str, str]) -> Launch:
        """The sandbox's entry point and limits (the agent is the entry point's stdio peer)."""

    def prepare_restore(self, record: SandboxRecord, snapshot_dir: Path) -> Launch:
        """The entry point that resumes a memory snapshot in this sandbox."""
        raise StateError(f"the {self.name} runtime cannot restore memory snapshots; use a state snapshot")

    async def launch(self, record: SandboxRecord, spec: ParsedSpec, env: dict[str, str],
                     restore: Path | None = None) -> str:
        """Start the shim that runs the entry point (or resumes the memory snapshot in `restore`);
        sets `record.pid`; returns how limits are applied."""
        sandbox_dir = Path(record.dir)
        (sandbox_dir / "workspace").mkdir(parents=True, exist_ok=True)
        plan = self.prepare_restore(record, restore) if restore else self.prepare(record, spec, env)
        argv = [
            sys.executable, "-m", "snapkernel.backend.shim",
            "--socket", str(sandbox_dir / LINK_SOCKET),
            "--exit-file", str(sandbox_dir / EXIT_FILE),
            "--limits", json.dumps(plan.limits),
            "--sandbox-id", record.id,
            "--", *plan.argv,
        ]
        # A plain Popen, not asyncio's: asyncio kills the children it still tracks when its loop closes,
        # and sandboxes must outlive the backend.
        with open(sandbox_dir / LOG_FILE, "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=plan.cwd or sandbox_dir / "workspace", env=plan.env, stdin=subprocess.DEVNULL,
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

    def cleanup(self, record: SandboxRecord) -> None:  # noqa: B027 - most runtimes hold nothing
        """Release what the runtime holds for a stopped sandbox (cgroups, mounts)."""
