"""The gRPC servicer: translates requests to the placement (placement.py) and errors to gRPC status, once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from snapkernel import __version__
from snapkernel.backend.placement import Placement
from snapkernel.errors import InvalidSpecError, SnapkernelError, abort
from snapkernel.protocol import hops
from snapkernel.protocol.spec import check_sandbox_id
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc
from snapkernel.protocol.wire import DELIM

log = logging.getLogger(__name__)
Ctx = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R")

_CLIENT_CHANNELS = (pb.SHELL, pb.CONTROL, pb.STDIN)
_EOF = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs


def _translate(fn: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Expected errors become their gRPC status with the message; the rest INTERNAL, logged whole."""

    @functools.wraps(fn)
    async def wrapper(self: BackendService, request: Any, context: Ctx) -> R:
        try:
            return await fn(self, request, context)
        except SnapkernelError as e:
            await abort(context, e)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            await abort(context, SnapkernelError(f"internal error in {fn.__name__}: {e}"))

    return wrapper


def check_client_frame(frame: pb.KernelFrame) -> None:
    if frame.channel not in _CLIENT_CHANNELS:
        raise InvalidSpecError(
            f"malformed frame: channel {frame.channel} cannot be sent to a kernel; "
            "use SHELL, CONTROL or STDIN"
        )
    if len(frame.parts) < 6 or DELIM not in frame.parts[1:3]:
        raise InvalidSpecError(
            f"malformed frame on channel {pb.Channel.Name(frame.channel)}: expected the client identity, "
            "'<IDS|MSG>', signature, header, parent header, metadata and content parts; got "
            f"{len(frame.parts)} part(s)"
        )


class BackendService(pb_grpc.BackendServicer):
    def __init__(self, placement: Placement) -> None:
        self.placement = placement

    @_translate
    async def CreateSandbox(self, request: pb.CreateSandboxRequest, context: Ctx) -> pb.Sandbox:
        return await self.placement.create(request)

    @_translate
    async def GetSandbox(self, request: pb.GetSandboxRequest, context: Ctx) -> pb.Sandbox:
        return await self.placement.get(check_sandbox_id(request.id))

    @_translate
    async def ListSandboxes(self, request: pb.ListSandboxesRequest, context: Ctx) -> pb.ListSandboxesResponse:
        return pb.ListSandboxesResponse(sandboxes=await self.placement.list_sandboxes(request.all))

    @_translate
    async def DeleteSandbox(self, request: pb.DeleteSandboxRequest, context: Ctx) -> pb.DeleteSandboxResponse:
        await self.placement.delete(check_sandbox_id(request.id))
        return pb.DeleteSandboxResponse()

    @_translate
    async def SignalKernel(self, request: pb.SignalKernelRequest, context: Ctx) -> pb.SignalKernelResponse:
        await self.placement.signal(check_sandbox_id(request.id), request.signal)
        return pb.SignalKernelResponse()

    @_translate
    async def RestartKernel(self, request: pb.RestartKernelRequest, context: Ctx) -> pb.Sandbox:
        return await self.placement.restart(check_sandbox_id(request.id))

    @_translate
    async def GetStatus(self, request: pb.GetStatusRequest, context: Ctx) -> pb.Status:
        status = await self.placement.status()
        status.version = __version__
        return status

    @_translate
    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Ctx) -> pb.SnapshotInfo:
        return await self.placement.create_snapshot(request)

    @_translate
    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: Ctx) -> pb.SnapshotInfo:
        return await self.placement.get_snapshot(request.id)

    @_translate
    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Ctx) -> pb.ListSnapshotsResponse:
        return pb.ListSnapshotsResponse(snapshots=await self.placement.list_snapshots(request.notebook_path))

    @_translate
    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: Ctx) -> pb.DeleteSnapshotResponse:
        await self.placement.delete_snapshot(request.id)
        return pb.DeleteSnapshotResponse()

    @_translate
    async def HibernateSandbox(self, request: pb.HibernateSandboxRequest, context: Ctx) -> pb.Sandbox:
        return await self.placement.hibernate(check_sandbox_id(request.id))

    @_translate
    async def WakeSandbox(self, request: pb.WakeSandboxRequest, context: Ctx) -> pb.Sandbox:
        return await self.placement.wake(check_sandbox_id(request.id))

    @_translate
    async def MoveSandbox(self, request: pb.MoveSandboxRequest, context: Ctx) -> pb.Sandbox:
        check_sandbox_id(request.id)
        if request.timeout < 0:
            raise InvalidSpecError(f"timeout {request.timeout:g} is not valid: give seconds above 0, or 0 for the "
                                   "backend's default")
        return await self.placement.move(request)

    @_translate
    async def ExportSandbox(self, request: pb.ExportSandboxRequest, context: Ctx) -> pb.SnapshotInfo:
        return await self.placement.export(check_sandbox_id(request.id))

    @_translate
    async def GetSandboxUsage(self, request: pb.GetSandboxUsageRequest, context: Ctx) -> pb.SandboxUsage:
        return await self.placement.usage(check_sandbox_id(request.id))

    async def WatchSandbox(self, request: pb.WatchSandboxRequest, context: Ctx) -> AsyncIterator[pb.SandboxEvent]:
        try:
            events = self.placement.watch(check_sandbox_id(request.id))
        except SnapkernelError as e:
            await abort(context, e)
        async with contextlib.aclosing(events):  # a client that goes away stops its watch at once
            async for event in events:
                yield event

    async def Attach(self, request_iterator: Any, context: Ctx) -> None:  # type: ignore[override]
        first = await context.read()
        if first is _EOF or first.WhichOneof("kind") != "open":
            await abort(context, InvalidSpecError("Attach: the first message must be `open` with a sandbox id"))
        sandbox_id = first.open.sandbox_id
        try:
            attachment = await self.placement.attach(check_sandbox_id(sandbox_id))
        except SnapkernelError as e:
            await abort(context, e)
        failure: list[SnapkernelError] = []

        async def pump_in() -> None:
            try:
                while (req := await context.read()) is not _EOF:
                    if req.WhichOneof("kind") != "frame":
                        raise InvalidSpecError("Attach: only frames may follow `open`")
                    if hops.ENABLED:
                        hops.mark("backend_in")
                    check_client_frame(req.frame)
                    attachment.send(req.frame)
            except SnapkernelError as e:
                failure.append(e)
            finally:
                attachment.outgoing.put_nowait(None)

        reader = asyncio.create_task(pump_in())
        unsent: list[pb.KernelFrame] = []
        try:
            while (frame := await attachment.outgoing.get()) is not None:
                unsent.append(frame)  # until written: a client that breaks off may not have it
                if hops.ENABLED:
                    hops.mark("backend_out")
                await context.write(pb.AttachResponse(frame=frame))
                unsent.pop()
                attachment.delivered(frame.seq)
        finally:
            attachment.close(unsent)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if failure:
            log.warning("sandbox_id=%s Attach closed: %s", sandbox_id, failure[0])
            await abort(context, failure[0])

    async def Map(self, request_iterator: Any, context: Ctx) -> None:  # type: ignore[override]
        """A fan-out job of a caller outside any sandbox; the same job as one relayed by a kernel's agent."""
        outgoing: asyncio.Queue[pb.MapResponse] = asyncio.Queue()
        job = self.placement.open_map(outgoing.put_nowait)

        async def pump_in() -> None:
            while (req := await context.read()) is not _EOF:
                await job.handle(req)

        reader = asyncio.create_task(pump_in())
        try:
            while True:
                resp = await outgoing.get()
                await context.write(resp)
                if resp.WhichOneof("kind") == "done":
                    break
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
            job.closed()
