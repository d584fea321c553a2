"""A fan-out job through the front: its workers spread over nodes, one sub-job (a `Map` stream) per node.

Ray places the workers: one placement group of one bundle per worker, `SPREAD`, says how many go to each node.
Each node's daemon runs its share as any job (its own workers, function cache and dispatch); the front hands
each node a window of items at a time, sends more as results come back, and passes results, blobs and status on
to the client, which puts them in order. A node that breaks off (it died, its daemon restarted) has the items it
held handed to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from snapkernel.backend.cluster import resources
from snapkernel.backend.cluster.node_link import NodeLink
from snapkernel.errors import SnapkernelError, describe
from snapkernel.protocol.spec import check_cpu, parse_gpu, parse_memory
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)
WINDOW_PER_WORKER = 4  # items a node holds per worker: enough to keep its workers busy between two batches
WORKER_MEMORY = 512 * 1024**2  # a worker's memory in Ray's books when the job does not say


class FanoutHost(Protocol):
    """What a job needs of the front (ray_placement.py)."""

    links: dict[str, NodeLink]

    async def reserve_spread(self, wants: dict[str, float], count: int, name: str) -> dict[str, int]: ...

    async def remove_group(self, name: str) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


@dataclass(eq=False)
class _Branch:
    link: NodeLink
    workers: int
    call: Any = None
    held: dict[int, pb.MapItem] = field(default_factory=dict)  # sent, no result yet
    needs_function: bool = False
    ready: int = 0
    gone: bool = False
    task: asyncio.Task[None] | None = None


class FrontMapJob:
    def __init__(self, front: FanoutHost, send: Callable[[pb.MapResponse], None]) -> None:
        self.front, self.send = front, send
        self.start: pb.MapStart | None = None
        self.function = b""
        self.branches: list[_Branch] = []
        self.queue: deque[pb.MapItem] = deque()
        self.blobs: list[pb.BlobChunk] = []  # every input blob chunk: a node that takes over an item needs it
        self.ended = self.finished = False
        self.group = ""
        self.asked_function = False

    async def handle(self, request: pb.MapRequest) -> None:
        kind = request.WhichOneof("kind")
        try:
            if self.finished:
                return
            if kind == "start":
                await self._start(request.start)
            elif self.start is None:
                raise SnapkernelError(f"Map: the first message must be `start`, not `{kind}`")
            elif kind == "function":
                self.function = request.function
                for b in self.branches:
                    if b.needs_function and not b.gone:
                        b.needs_function = False
                        await b.call.write(pb.MapRequest(function=self.function))
            elif kind == "items":
                self.queue.extend(request.items.items)
                await self._feed()
            elif kind == "blob":
                self.blobs.append(request.blob)
                for b in self._live():
                    await b.call.write(request)
            elif kind == "end":
                self.ended = True
                await self._feed()
            elif kind == "cancel":
                self.queue.clear()
                for b in self._live():
                    with contextlib.suppress(Exception):
                        await b.call.write(request)
                self._finish(pb.MapDone(cancelled=True))
            else:
                raise SnapkernelError("--clone jobs run on the kernel's own node; this front got one from outside "
                                      "any kernel")
        except SnapkernelError as e:
            self._finish(pb.MapDone(error=str(e)))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
            log.warning("fan-out through the front: a node stream failed: %s", e)

    def _live(self) -> list[_Branch]:
        return [b for b in self.branches if not b.gone]

    async def _start(self, start: pb.MapStart) -> None:
        if self.start is not None:
            raise SnapkernelError("Map: `start` was sent twice on one stream")
        if not 1 <= start.workers <= 256:
            raise SnapkernelError(f"workers {start.workers} is not accepted: ask for 1 to 256")
        self.start = start
        gpu = parse_gpu(start.spec.gpu)
        wants = {"CPU": check_cpu(start.spec.cpu) if start.spec.HasField("cpu") else 1.0,
                 "memory": float(parse_memory(start.spec.memory) if start.spec.memory else WORKER_MEMORY),
                 resources.NODE: resources.SLIVER}
        if gpu is not None:
            wants["GPU"] = float(gpu.count)
        self.group = f"sk-job-{secrets.token_hex(4)}"
        per_node = await self.front.reserve_spread(wants, start.workers, self.group)
        for node_id, count in per_node.items():
            self.branches.append(_Branch(self.front.links[node_id], count))
        for b in self.branches:
            await self._open(b)
        self.send(pb.MapResponse(status=pb.MapStatus(
            workers=start.workers, message=f"{start.workers} worker(s) on " + ", ".join(
                f"{b.link.name} ({b.workers})" for b in self.branches))))

    async def _open(self, b: _Branch) -> None:
        assert self.start is not None
        sub = pb.MapStart()
        sub.CopyFrom(self.start)
        sub.workers = b.workers
        b.call = b.link.map()
        await b.call.write(pb.MapRequest(start=sub))
        for chunk in self.blobs:
            await b.call.write(pb.MapRequest(blob=chunk))
        b.task = asyncio.ensure_future(self._read(b))

    async def _read(self, b: _Branch) -> None:
        why = "its stream ended"
        try:
            async for resp in b.call:
                kind = resp.WhichOneof("kind")
                if kind == "status":
                    await self._on_status(b, resp.status)
                elif kind == "results":
                    for r in resp.results.results:
                        b.held.pop(r.index, None)
                    self.send(resp)
                    await self._feed()
                elif kind == "blob":
                    self.send(resp)
                elif kind == "done":
                    if resp.done.error and not self.finished:
                        why = resp.done.error
                        break
                    if not b.held and not resp.done.cancelled:
                        return
        except grpc.aio.AioRpcError as e:
            why = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            why = describe(e)
        await self._lost(b, why)

    async def _on_status(self, b: _Branch, status: pb.MapStatus) -> None:
        if status.need_function:
            if self.function:
                await b.call.write(pb.MapRequest(function=self.function))
            else:
                b.needs_function = True
                if not self.asked_function:
                    self.asked_function = True
                    self.send(pb.MapResponse(status=pb.MapStatus(need_function=True)))
            return
        b.ready = status.workers_ready
        self.send(pb.MapResponse(status=pb.MapStatus(
            workers_ready=sum(x.ready for x in self._live()), workers=sum(x.workers for x in self._live()),
            message=f"{b.link.name}: {status.message}" if status.message else "")))

    async def _lost(self, b: _Branch, why: str) -> None:
        """A node broke off: its items go back to the queue for the others."""
        if b.gone or self.finished:
            return
        b.gone = True
        back = list(b.held.values())
        b.held.clear()
        self.queue.extendleft(reversed(back))
        log.warning("fan-out: %s left the job (%s); %d item(s) go to other nodes", b.link.describe(), why, len(back))
        if not self._live():
            self._finish(pb.MapDone(error=f"every node of the job broke off; the last, {b.link.name}: {why}"))
            return
        self.send(pb.MapResponse(status=pb.MapStatus(
            workers_ready=sum(x.ready for x in self._live()), workers=sum(x.workers for x in self._live()),
            message=f"{b.link.name} left the job ({why}); its {len(back)} item(s) run elsewhere")))
        await self._feed()

    async def _feed(self) -> None:
        for b in self._live():
            room = b.workers * WINDOW_PER_WORKER - len(b.held)
            batch = [self.queue.popleft() for _ in range(min(room, len(self.queue)))]
            if batch:
                for item in batch:
                    b.held[item.index] = item
                try:
                    await b.call.write(pb.MapRequest(items=pb.MapItems(items=batch)))
                except (grpc.aio.AioRpcError, grpc.aio.UsageError) as e:
                    await self._lost(b, str(e))
                    return
        if self.ended and not self.queue and not any(b.held for b in self._live()):
            for b in self._live():
                with contextlib.suppress(Exception):
                    await b.call.write(pb.MapRequest(end=True))
            self._finish(pb.MapDone())

    def _finish(self, done: pb.MapDone) -> None:
        if self.finished:
            return
        self.finished = True
        self.send(pb.MapResponse(done=done))
        self.front.spawn(self.front.remove_group(self.group))

    def closed(self) -> None:
        self.finished = True
        for b in self.branches:
            if b.call is not None:
                b.call.cancel()
            if b.task is not None:
                b.task.cancel()
        self.front.spawn(self.front.remove_group(self.group))
