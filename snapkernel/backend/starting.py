"""Starting a sandbox: a boot, or a restore of a memory snapshot or a template (templates.py) that then gets
its own identity (a restored fan-out worker then says hello again, as its new sandbox); a template whose restore
fails leaves nothing behind and the sandbox boots instead."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.templates import WORKER, mode
from snapkernel.errors import describe
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import memory

if TYPE_CHECKING:
    from snapkernel.backend.agent_messages import AgentMessages
    from snapkernel.backend.runtimes.base import SandboxRuntime
    from snapkernel.backend.sandbox import Defaults, LiveSandbox
    from snapkernel.backend.templates import Templates
    from snapkernel.backend.workspace import Workspaces

log = logging.getLogger(__name__)

SLOT_WAIT = 2.0  # seconds a template's restore waits for a free slot at most (then it goes ahead anyway)


class StartHost(Protocol):
    """What starting uses of the sandbox manager (sandboxes.py), and all it uses."""

    defaults: Defaults
    messages: AgentMessages
    templates: Templates
    workspaces: Workspaces

    def set_state(self, sb: LiveSandbox, state: int, message: str | None = None,
                  progress: pb.Progress | None = None) -> None: ...

    def progress(self, sb: LiveSandbox, step: str, message: str, fraction: float = -1.0) -> None: ...

    def prepare_workspace(self, sb: LiveSandbox) -> Path: ...

    async def connect(self, sb: LiveSandbox, runtime: SandboxRuntime, timeout: float) -> None: ...

    def release(self, sb: LiveSandbox) -> None: ...


class Starter:
    def __init__(self, host: StartHost) -> None:
        self.m = host
        # Template restores run at most one per core at once, the others wait their turn (briefly: SLOT_WAIT). A
        # restore is a burst of CPU: side by side on too few cores, four workers' restores each take twice as
        # long, and a cold fan-out waits for the first of them; in turn, the first come sooner and all as soon.
        self.restore_slots = asyncio.Semaphore(max(1, len(os.sched_getaffinity(0))))

    async def start(self, sb: LiveSandbox, runtime: SandboxRuntime, kernel: pb.KernelConfig,
                    restore: Path | None, template: str = "") -> None:
        """Boot the sandbox, or restore it from a memory snapshot or the template `template`."""
        r = sb.record
        try:
            if restore is None:
                await asyncio.to_thread(self.m.prepare_workspace, sb)
                self.m.progress(sb, "sandbox", f"starting a {r.runtime} sandbox", 0.1)
                await self._launch(sb, runtime, kernel, None)
                if not sb.internal:  # booted: the next kernel (or worker) of its class restores a template of it
                    self.m.templates.ensure(sb.spec, runtime)
            else:
                async with self._slot(bool(template)):
                    with sb.doing(Activity.RESTORING, "restore"):
                        await self._restore(sb, runtime, kernel, restore, template)
        except Exception as e:
            if template and not sb.deleting:  # never fails because of a template: it boots instead
                self.m.templates.failed(template, f"restoring it failed: {e}", taken=r.created)
                await self._undo_start(sb, runtime)
                await self.start(sb, runtime, kernel, None)
                return
            why = describe(e)
            if sb.deleting:  # deleted while it started: its start was cut short, nothing went wrong
                log.info("sandbox_id=%s deleted while starting (%s)", r.id, why)
            else:
                log.exception("sandbox_id=%s failed to start", r.id)
            with contextlib.suppress(Exception):
                await runtime.stop(r)
            self.m.release(sb)
            self.m.set_state(sb, pb.FAILED, f"sandbox failed to start: {why}")

    @contextlib.asynccontextmanager
    async def _slot(self, wanted: bool) -> AsyncIterator[None]:
        """A restore slot, if `wanted` and one comes free within SLOT_WAIT seconds (a restore that hangs holds up
        the others no longer than that)."""
        held = False
        if wanted:
            with contextlib.suppress(TimeoutError):
                held = await asyncio.wait_for(self.restore_slots.acquire(), SLOT_WAIT)
        try:
            yield
        finally:
            if held:
                self.restore_slots.release()

    async def _restore(self, sb: LiveSandbox, runtime: SandboxRuntime, kernel: pb.KernelConfig, image: Path,
                       template: str) -> None:
        r = sb.record
        started = time.perf_counter()
        workspace = await asyncio.to_thread(self.m.prepare_workspace, sb)
        what = (f"{'worker ' if mode(sb.spec) == WORKER else ''}template {template}" if template
                else f"snapshot {sb.spec.restore_from}")
        self.m.progress(sb, "restore", f"restoring {what}", 0.1)
        await memory.restore_workspace(image, workspace)
        await asyncio.to_thread(self.m.workspaces.give, workspace, runtime.owner(sb.spec))
        await self._launch(sb, runtime, kernel, image)
        r.kernel_generation = max(r.kernel_generation, 1)  # a resumed agent does not start over: its kernel runs
        # A template's kernel must sign with this sandbox's key before anyone reaches it; a resumed snapshot's
        # signs with the snapshot's already (its clients were given that key). Either takes this sandbox's memory
        # limit (a snapshot may resume with more than it had; GPU kernels have no address-space limit).
        await self.m.messages.give_identity(sb, sb.identity_env(kernel),
                                            self.m.defaults.start_timeout if template else None,
                                            sb.spec.memory if sb.spec.gpu is None else 0)
        self.m.set_state(sb, pb.RUNNING, "", pb.Progress(step="restore", message="kernel resumed", fraction=1.0))
        log.info("sandbox_id=%s restored from %s in %.2fs", r.id, what, time.perf_counter() - started)

    async def _launch(self, sb: LiveSandbox, runtime: SandboxRuntime, kernel: pb.KernelConfig,
                      image: Path | None) -> None:
        sb.record.limits = await runtime.launch(sb.record, sb.spec, sb.env(kernel), image)
        self.m.set_state(sb, pb.STARTING, "", pb.Progress(step="agent", message="agent starting", fraction=0.4))
        await self.m.connect(sb, runtime, self.m.defaults.start_timeout)

    async def _undo_start(self, sb: LiveSandbox, runtime: SandboxRuntime) -> None:
        """What a failed restore left, so that the sandbox can boot in its place."""
        if sb.link is not None:
            await sb.link.detach()  # not reported as the sandbox's end
            sb.link = None
        with contextlib.suppress(Exception):
            await runtime.stop(sb.record)
        sb.last_seq = 0
        sb.undelivered.clear()
        sb.fail_code_results("the restore failed")
