"""Sandboxes nobody owns any more: those of kernels no client has attached to for a while, and, in lab mode,
every sandbox at start and at a clean stop.

A kernel's client is the Jupyter server's provisioner, attached through the `Attach` stream for as long as
Jupyter has the kernel. A kernel that has had no client for `orphan_timeout` seconds belongs to a Jupyter
server that went away without shutting it down: it is hibernated where it can be (it then holds only disk,
and a client that comes back wakes it), otherwise removed. Fan-out workers are owned by their jobs and pools
(workers.py reaps them), never by a client, so they are left alone here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from snapkernel.backend.tasks import stop_task
from snapkernel.backend.workers import is_worker
from snapkernel.errors import SnapkernelError
from snapkernel.protocol.v1 import backend_pb2 as pb

if TYPE_CHECKING:
    from snapkernel.backend.sandbox import LiveSandbox
    from snapkernel.backend.sandboxes import SandboxManager

log = logging.getLogger(__name__)

# Only these hold a kernel that a client could use; starting ones are bounded by the start timeout, and
# hibernated ones already gave back what they held.
_REAPABLE = frozenset({pb.RUNNING, pb.KERNEL_EXITED})


def check_interval(timeout: float) -> float:
    """How often to look: often enough to act within about a quarter of the timeout, at most once a minute."""
    return max(0.1, min(60.0, timeout / 4))


class OrphanReaper:
    def __init__(self, manager: SandboxManager, timeout: float) -> None:
        self.m = manager
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.timeout > 0:
            self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        await stop_task(self._task)

    def orphans(self, now: float) -> list[LiveSandbox]:
        return [sb for sb in self.m.live.values()
                if sb.record.state in _REAPABLE and not sb.attached and sb.activity is None
                and not sb.busy  # like Jupyter's own culler: a running cell is left to finish
                and not is_worker(sb.record.spec) and not sb.internal and now - sb.detached_at >= self.timeout]

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(check_interval(self.timeout))
            for sb in self.orphans(time.time()):
                try:
                    await self.reap(sb)
                except Exception:  # the watch must outlive one bad sandbox
                    log.exception("sandbox_id=%s could not be reaped", sb.record.id)

    async def reap(self, sb: LiveSandbox) -> None:
        r = sb.record
        why = f"no client attached for {time.time() - sb.detached_at:.0f}s (orphan_timeout {self.timeout:g}s)"
        if r.state == pb.RUNNING:
            try:
                await self.m.hibernator.hibernate(sb, why)
                log.warning("sandbox_id=%s kernel_id=%s hibernated: %s", r.id, r.kernel_id, why)
                return
            except SnapkernelError as e:
                if sb.record.state != pb.RUNNING or sb.attached:  # it changed meanwhile: look again next time
                    return
                why = f"{why}; it could not hibernate: {e}"
        log.warning("sandbox_id=%s kernel_id=%s removed: %s", r.id, r.kernel_id, why)
        await self.m.delete(r.id)


async def remove_all(manager: SandboxManager, why: str, timeout: float = 60.0) -> int:
    """Remove every sandbox of this backend, asleep and ended ones too (snapshots in the store stay); returns
    how many were kernels. For a backend whose kernels cannot outlive it (`snapkernel lab`'s)."""
    sandboxes = [sb for sb in manager.live.values() if not sb.deleting]
    if not sandboxes:
        return 0

    async def one(sb: LiveSandbox) -> None:
        log.warning("sandbox_id=%s kernel_id=%s state=%s removed: %s", sb.record.id, sb.record.kernel_id,
                    manager.state_name(sb), why)
        try:
            await manager.delete(sb.record.id)
        except SnapkernelError as e:
            log.warning("sandbox_id=%s not removed: %s", sb.record.id, e)

    try:  # in parallel: each stop may wait out a grace period
        await asyncio.wait_for(asyncio.gather(*(one(sb) for sb in sandboxes)), timeout)
    except TimeoutError:
        log.error("removing %d sandboxes took over %gs; the next start removes what is left", len(sandboxes),
                  timeout)
    return sum(1 for sb in sandboxes if not sb.internal)  # the pool's and templates' are nobody's kernels
