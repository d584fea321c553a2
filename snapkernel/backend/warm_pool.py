"""The warm pool: sandboxes restored from a class's template, running, waiting for a kernel request. The default
spec's class has one (`warm_pool`), other classes where the admin lists them (`warm_pool_classes`).

A request of a pool's class gets one in milliseconds: it is given the request's identity (session key, kernel id)
and becomes the request's sandbox; the pool refills in the background. Pool sandboxes count against capacity
like any other, so the pool fills only where there is room, and one is removed first when a request needs
its room. They are never listed, never hibernate, and go when the backend stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from snapkernel.backend.sandbox import POOL_KERNEL_ID, LiveSandbox
from snapkernel.backend.tasks import stop_task
from snapkernel.backend.templates import class_spec
from snapkernel.errors import NoCapacityError, SnapkernelError
from snapkernel.protocol.v1 import backend_pb2 as pb

if TYPE_CHECKING:
    from snapkernel.backend.agent_messages import AgentMessages
    from snapkernel.backend.sandbox import Defaults
    from snapkernel.protocol.spec import ParsedSpec

log = logging.getLogger(__name__)

LEAVING = POOL_KERNEL_ID + "leaving"  # a pool sandbox that gave its room, until it is removed
FILL_INTERVAL = 2.0  # seconds between looks at whether the pool is short (a hand-out looks at once)


class PoolHost(Protocol):
    """What the pool uses of the sandbox manager (sandboxes.py), and all it uses."""

    live: dict[str, LiveSandbox]
    messages: AgentMessages
    defaults: Defaults

    def pool_class(self, spec: pb.SandboxSpec) -> tuple[ParsedSpec, str] | None: ...

    def set_state(self, sb: LiveSandbox, state: int, message: str | None = None,
                  progress: pb.Progress | None = None) -> None: ...

    async def create(self, req: pb.CreateSandboxRequest) -> pb.Sandbox: ...

    async def delete(self, sandbox_id: str) -> None: ...


class WarmPool:
    def __init__(self, host: PoolHost, classes: list[tuple[pb.SandboxSpec, int]]) -> None:
        self.host = host
        self.classes = [(spec, size) for spec, size in classes if size > 0]  # (a class's spec, sandboxes kept)
        self.size = sum(size for _, size in self.classes)
        self.handed_out = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def to_pb(self) -> pb.WarmPool:
        ready = sum(sb.record.state == pb.RUNNING and sb.record.kernel_id != LEAVING for sb in self.members())
        return pb.WarmPool(size=self.size, ready=ready, handed_out=self.handed_out)

    def start(self) -> None:
        if self.classes:
            self._task = asyncio.ensure_future(self._fill_loop())

    async def stop(self) -> None:
        """Stop filling and remove every pool sandbox: none is anybody's kernel."""
        await stop_task(self._task)
        for sb in self.members():
            with contextlib.suppress(SnapkernelError):
                await self.host.delete(sb.record.id)

    def members(self, key: str | None = None) -> list[LiveSandbox]:
        """The pool's sandboxes (of template class `key` only, if given)."""
        prefix = POOL_KERNEL_ID + (key or "")
        return [sb for sb in self.host.live.values()
                if sb.record.kernel_id.startswith(prefix) and not sb.deleting and not sb.record.ended]

    async def hand_out(self, key: str, req: pb.CreateSandboxRequest, spec: ParsedSpec,
                       hibernate_after: float) -> pb.Sandbox | None:
        """A running pool sandbox of the template class `key`, made the sandbox of request `req`; None when
        the pool has none ready (or the one it had did not take its identity: then it is removed)."""
        sb = next((sb for sb in self.members()
                   if sb.record.kernel_id == POOL_KERNEL_ID + key and sb.record.state == pb.RUNNING), None)
        if sb is None:
            return None
        r = sb.record
        r.kernel_id = req.kernel_id  # out of the pool: never handed out twice
        self._wake.set()
        r.spec, r.kernel, r.notebook_path, r.hibernate_after = req.spec, req.kernel, req.notebook_path, hibernate_after
        r.created = r.last_activity = sb.detached_at = time.time()  # not an orphan: its client comes now
        sb.spec = spec
        sb.unattached.clear()  # the pool's own kernel output: nobody's
        sb.unattached_bytes = 0
        try:
            await self.host.messages.give_identity(sb, sb.identity_env(req.kernel),
                                                   self.host.defaults.start_timeout)
        except SnapkernelError as e:
            log.warning("sandbox_id=%s removed from the warm pool: %s", r.id, e)
            with contextlib.suppress(SnapkernelError):
                await self.host.delete(r.id)
            return None
        self.handed_out += 1
        self.host.set_state(sb, pb.RUNNING, "from the warm pool")
        return r.to_pb()

    def give_room(self, enough: Callable[[LiveSandbox], bool]) -> LiveSandbox | None:
        """A pool sandbox whose room a request needs (`enough` says whether its room is enough: a request
        short of GPUs gains nothing), out of the pool (not counted as missing, so nothing refills in its
        place before the request has its room); the caller takes its claim and removes it."""
        sb = next((sb for sb in self.members() if sb.record.kernel_id != LEAVING and enough(sb)), None)
        if sb is None:
            return None
        sb.record.kernel_id = LEAVING
        log.info("sandbox_id=%s removed from the warm pool: a request needs its room", sb.record.id)
        return sb

    async def _fill_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._fill()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warm pool: filling failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FILL_INTERVAL)

    async def _fill(self) -> None:
        """One more sandbox for the first class that is short of its size (the loop comes back for more)."""
        for spec, size in self.classes:
            ready = self.host.pool_class(spec)  # only once its template is ready: pool sandboxes restore it
            if ready is not None and len(self.members(ready[1])) < size and await self._add(*ready):
                return

    async def _add(self, spec: ParsedSpec, key: str) -> bool:
        """A new pool sandbox of this class (False where there is no room for it, or it did not start)."""
        started = time.perf_counter()
        request = pb.CreateSandboxRequest(
            kernel_id=POOL_KERNEL_ID + key, spec=class_spec(spec),
            kernel=pb.KernelConfig(key=secrets.token_hex(32).encode(), signature_scheme="hmac-sha256"))
        try:
            sandbox = await self.host.create(request)
        except NoCapacityError as e:
            log.debug("warm pool: no room for another sandbox: %s", e)
            return False
        sb = self.host.live[sandbox.id]
        try:
            async with sb.changed:
                await asyncio.wait_for(sb.changed.wait_for(lambda: sb.record.state not in (pb.PENDING, pb.STARTING)),
                                       self.host.defaults.start_timeout)
        except TimeoutError:
            pass
        if sb.record.state != pb.RUNNING:
            log.warning("warm pool: sandbox %s did not start: %s", sandbox.id, sb.record.message)
            with contextlib.suppress(SnapkernelError):
                await self.host.delete(sandbox.id)
            return False
        log.info("sandbox_id=%s waits in the warm pool (ready in %.2fs)", sandbox.id, time.perf_counter() - started)
        self._wake.set()  # look again at once: it may still be short
        return True
