"""The front's side of a client's `Attach`: the kernel's frames to and from the daemon of the sandbox's node.

Frames pass through unchanged but for their output numbers: a sandbox that wakes on another node starts a new
count there, so the front adds the numbers given out before (`Placed.seq_base`) and a client never takes new
output for old. A frame for a hibernated sandbox first wakes it through the front, which may place it on
another node; the stream then follows it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import grpc

from snapkernel.backend.cluster.node_link import NodeLink
from snapkernel.errors import NotFoundError, SnapkernelError
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)
RECONNECT_DELAY = 0.2


class AttachHost(Protocol):
    """What an attachment needs of the front (ray_placement.py)."""

    unsent: dict[str, list[pb.KernelFrame]]
    seq_out: dict[str, int]  # the highest output number given out per sandbox

    def link_of(self, sandbox_id: str) -> tuple[NodeLink, int]:
        """The node the sandbox is on now, and the output numbers given out before it came there."""

    def asleep(self, sandbox_id: str) -> bool: ...

    async def started(self, sandbox_id: str) -> None:
        """Once a sandbox that started on another node runs there (or has ended)."""

    def ended(self, sandbox_id: str) -> bool:
        """It has ended (lost with its node, for one): nothing to wait for."""

    async def wake(self, sandbox_id: str) -> pb.Sandbox: ...


class FrontAttachment:
    def __init__(self, front: AttachHost, sandbox_id: str) -> None:
        self.front, self.sandbox_id = front, sandbox_id
        self.outgoing: asyncio.Queue[pb.KernelFrame | None] = asyncio.Queue()
        for frame in front.unsent.pop(sandbox_id, []):  # what the last client may not have had
            self.outgoing.put_nowait(frame)
        self.to_kernel: asyncio.Queue[pb.KernelFrame] = asyncio.Queue()
        self.unanswered: list[pb.KernelFrame] = []  # written to the node since its last output
        self.task = asyncio.ensure_future(self._run())

    def send(self, frame: pb.KernelFrame) -> None:
        self.to_kernel.put_nowait(frame)

    def delivered(self, seq: int) -> None:
        """The node counted it delivered once written to the front's stream."""

    def close(self, unsent: list[pb.KernelFrame]) -> None:
        self.task.cancel()
        left = list(unsent)
        while not self.outgoing.empty():
            frame = self.outgoing.get_nowait()
            if frame is not None:
                left.append(frame)
        if left:
            self.front.unsent[self.sandbox_id] = left

    async def _run(self) -> None:
        pending: list[pb.KernelFrame] = []  # taken from to_kernel, not yet written to a node
        last: NodeLink | None = None
        try:
            while True:
                try:
                    link, base = self.front.link_of(self.sandbox_id)
                except NotFoundError:
                    return
                if not link.alive:
                    if self.front.ended(self.sandbox_id):
                        log.info("sandbox_id=%s: its node %s is lost: Attach ends", self.sandbox_id, link.name)
                        return
                    await asyncio.sleep(RECONNECT_DELAY)  # being re-placed from a snapshot (replace_lost)
                    continue
                if last is not None and link is not last and not last.alive:
                    # Its node died: what it took and never answered goes to the sandbox re-placed from its snapshot.
                    pending[:0], self.unanswered = self.unanswered, []
                if last is not None and link is not last:
                    await self.front.started(self.sandbox_id)  # its variables load before the first cell runs
                last = link
                moved = await self._through(link, base, pending)
                if not moved:
                    return
                await asyncio.sleep(RECONNECT_DELAY)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sandbox_id=%s: Attach through the front failed", self.sandbox_id)
        finally:
            self.outgoing.put_nowait(None)

    async def _through(self, link: NodeLink, base: int, pending: list[pb.KernelFrame]) -> bool:
        """Carry frames through `link` until its stream ends; True when the sandbox may be reached again
        (woken elsewhere, its daemon restarted)."""
        call = link.attach()
        try:
            await call.write(pb.AttachRequest(open=pb.AttachOpen(sandbox_id=self.sandbox_id)))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:  # its daemon restarts: frames wait meanwhile
            log.info("sandbox_id=%s: %s does not take Attach (%s)", self.sandbox_id, link.describe(), e.__class__)
            return True

        async def read() -> None:
            async for resp in call:
                frame = resp.frame
                self.unanswered.clear()
                if frame.seq:
                    frame.seq += base
                    self.front.seq_out[self.sandbox_id] = max(frame.seq, self.front.seq_out.get(self.sandbox_id, 0))
                self.outgoing.put_nowait(frame)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                if not pending:
                    getter = asyncio.ensure_future(self.to_kernel.get())
                    done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                    if getter not in done:
                        getter.cancel()
                        break
                    pending.append(getter.result())
                if self.front.asleep(self.sandbox_id):
                    await self.front.wake(self.sandbox_id)  # through the front: it may come back elsewhere
                    if self.front.link_of(self.sandbox_id)[0] is not link:
                        return True
                await call.write(pb.AttachRequest(frame=pending[0]))
                self.unanswered.append(pending.pop(0))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.info("sandbox_id=%s: Attach to %s broke (%s)", self.sandbox_id, link.describe(), e)
        except SnapkernelError as e:
            log.warning("sandbox_id=%s: waking through the front failed: %s", self.sandbox_id, e)
            return False
        finally:
            with contextlib.suppress(Exception):
                await call.done_writing()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
        try:
            self.front.link_of(self.sandbox_id)
        except NotFoundError:
            return False
        return True
