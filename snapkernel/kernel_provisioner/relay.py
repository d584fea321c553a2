"""The local relay: ZMQ sockets on 127.0.0.1 that the Jupyter server connects to as if to a kernel.

Shell, control and stdin are ROUTER sockets (the client's identity travels with each message, so replies
go back to the client that asked); iopub is a PUB socket; heartbeat is answered here while the sandbox
lives. Everything else rides one gRPC Attach stream, re-opened after a backend restart; messages sent
while it is down wait here and go out when it is back. Kernel output held for us meanwhile (by the shim and
the backend) comes when it is back; numbered, so what came already before the break is not delivered twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import grpc
import zmq
import zmq.asyncio

from snapkernel.client import BackendClient
from snapkernel.errors import NotFoundError, SnapkernelError, UnauthenticatedError, from_grpc
from snapkernel.protocol import hops
from snapkernel.protocol.states import ENDED
from snapkernel.protocol.v1 import backend_pb2 as pb

log = logging.getLogger(__name__)

CHANNELS = {"shell": pb.SHELL, "control": pb.CONTROL, "stdin": pb.STDIN}
_CHANNEL_NAMES = {v: k for k, v in CHANNELS.items()}
MAX_QUEUED = 10000
RETRY_DELAYS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class KernelRelay:
    def __init__(self, client: BackendClient, sandbox_id: str, ports: dict[str, int] | None = None,
                 on_event: Callable[[pb.SandboxEvent], None] | None = None) -> None:
        self.client = client
        self.sandbox_id = sandbox_id
        self.requested_ports = ports or {}
        self.on_event = on_event
        self.ctx = zmq.asyncio.Context()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.ports: dict[str, int] = {}
        self.sandbox: pb.Sandbox | None = None
        self.changed = asyncio.Condition()
        self.outgoing: collections.deque[pb.KernelFrame] = collections.deque()
        self.has_outgoing = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False
        self.last_seq = 0  # the highest numbered kernel output delivered

    # --- life -----------------------------------------------------------------------------------
    def bind(self) -> dict[str, int]:
        """Bind the five sockets (cached ports across restarts); returns {name: port}."""
        kinds = {"shell": zmq.ROUTER, "control": zmq.ROUTER, "stdin": zmq.ROUTER,
                 "iopub": zmq.PUB, "hb": zmq.ROUTER}
        for name, kind in kinds.items():
            sock = self.ctx.socket(kind)
            sock.linger = 0
            if kind == zmq.ROUTER:
                sock.router_mandatory = 0
            port = self.requested_ports.get(name, 0)
            if port:
                sock.bind(f"tcp://127.0.0.1:{port}")
            else:
                port = sock.bind_to_random_port("tcp://127.0.0.1")
            self.sockets[name] = sock
            self.ports[name] = port
        return dict(self.ports)

    def start(self) -> None:
        for name in CHANNELS:
            self.tasks.append(asyncio.create_task(self._from_client(name)))
        self.tasks.append(asyncio.create_task(self._heartbeat()))
        self.tasks.append(asyncio.create_task(self._attach_loop()))
        self.tasks.append(asyncio.create_task(self._watch_loop()))

    async def close(self) -> None:
        self.closed = True
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for sock in self.sockets.values():
            sock.close(0)
        self.ctx.term()

    @property
    def alive(self) -> bool:
        return self.sandbox is not None and self.sandbox.state not in ENDED \
            and self.sandbox.state != pb.KERNEL_EXITED

    async def wait_for(self, predicate: Callable[[pb.Sandbox], bool], timeout: float) -> pb.Sandbox:
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: self.sandbox is not None and predicate(self.sandbox)), timeout)
        assert self.sandbox is not None
        return self.sandbox

    # --- client → backend -----------------------------------------------------------------------
    async def _from_client(self, name: str) -> None:
        sock = self.sockets[name]
        channel = CHANNELS[name]
        while True:
            parts = await sock.recv_multipart()
            if hops.ENABLED:
                hops.mark("relay_in")
            if len(self.outgoing) >= MAX_QUEUED:
                log.warning("sandbox_id=%s relay queue full; dropping a %s message", self.sandbox_id, name)
                continue
            self.outgoing.append(pb.KernelFrame(channel=channel, parts=parts))
            self.has_outgoing.set()

    async def _heartbeat(self) -> None:
        sock = self.sockets["hb"]
        while True:
            parts = await sock.recv_multipart()
            if self.alive:
                await sock.send_multipart(parts)

    # --- backend → client -----------------------------------------------------------------------
    def _deliver(self, frame: pb.KernelFrame) -> None:
        if hops.ENABLED:
            hops.mark("relay_out")
        if frame.channel == pb.IOPUB:
            self.sockets["iopub"].send_multipart(list(frame.parts), copy=False)
            return
        name = _CHANNEL_NAMES.get(frame.channel)
        if name is not None and frame.parts:
            self.sockets[name].send_multipart(list(frame.parts), copy=False)

    async def _attach_loop(self) -> None:
        attempt = 0
        while not self.closed:
            call = self.client.attach()
            sender: asyncio.Task[None] | None = None
            try:
                await call.write(pb.AttachRequest(open=pb.AttachOpen(sandbox_id=self.sandbox_id)))
                sender = asyncio.create_task(self._send(call))
                async for resp in call:
                    attempt = 0
                    if resp.frame.seq:  # numbered kernel output: after a reconnect, some may come again
                        if resp.frame.seq <= self.last_seq:
                            continue
                        self.last_seq = resp.frame.seq
                    self._deliver(resp.frame)
                code = await call.code()
                if code != grpc.StatusCode.OK:
                    log.warning("sandbox_id=%s Attach ended: %s %s", self.sandbox_id, code, await call.details())
            except grpc.aio.AioRpcError as e:
                err = from_grpc(e, self.client.address)  # the class the daemon raised, not just the code
                if isinstance(err, (NotFoundError, UnauthenticatedError)):
                    log.error("sandbox_id=%s Attach refused (%s): %s", self.sandbox_id, err.reason, err)
                    return
                log.info("sandbox_id=%s Attach broke (%s); reconnecting", self.sandbox_id, e.code())
            finally:
                if sender is not None:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sender
                call.cancel()
            if self.sandbox is not None and self.sandbox.state in ENDED:
                return
            await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
            attempt += 1

    async def _send(self, call: Any) -> None:
        while True:
            if not self.outgoing:
                self.has_outgoing.clear()
                await self.has_outgoing.wait()
                continue
            frame = self.outgoing[0]
            try:
                await call.write(pb.AttachRequest(frame=frame))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the stream broke; the receiving side reconnects and this frame goes again
            self.outgoing.popleft()

    # --- state ----------------------------------------------------------------------------------
    async def _watch_loop(self) -> None:
        attempt = 0
        while not self.closed:
            try:
                async for event in self.client.watch(self.sandbox_id):
                    attempt = 0
                    await self._update(event.sandbox)
                    if self.on_event is not None:
                        self.on_event(event)
            except NotFoundError:
                await self._update(None, gone=True)
                return
            except SnapkernelError as e:
                log.info("sandbox_id=%s watch broke (%s); reconnecting", self.sandbox_id, e)
            if self.sandbox is not None and self.sandbox.state in ENDED:
                return
            await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
            attempt += 1

    async def _update(self, sandbox: pb.Sandbox | None, gone: bool = False) -> None:
        if gone:
            sandbox = pb.Sandbox(id=self.sandbox_id, state=pb.DELETED, message="the sandbox no longer exists",
                                 exit_code=1)
        self.sandbox = sandbox
        async with self.changed:
            self.changed.notify_all()
