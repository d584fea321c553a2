"""The gRPC servicer: translates requests to the sandbox manager and errors to gRPC status, once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.json_format import ParseDict

from snapkernel import __version__
from snapkernel.backend.fanout import FanoutManager
from snapkernel.backend.runtimes.base import RuntimeInfo
from snapkernel.backend.sandboxes import SandboxManager
from snapkernel.backend.usage import UsageSampler
from snapkernel.errors import InvalidSpecError, SnapkernelError, abort
from snapkernel.host.gpus import inventory
from snapkernel.protocol.spec import check_sandbox_id
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc
from snapkernel.snapshots import memory
from snapkernel.snapshots.store import Snapshot

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
    if len(frame.parts) < 6 or b"<IDS|MSG>" not in frame.parts[1:3]:
        raise InvalidSpecError(
            f"malformed frame on channel {pb.Channel.Name(frame.channel)}: expected the client identity, "
            "'<IDS|MSG>', signature, header, parent header, metadata and content parts; got "
            f"{len(frame.parts)} part(s)"
        )


def snapshot_info(snap: Snapshot) -> pb.SnapshotInfo:
    if snap.damaged:
        return pb.SnapshotInfo(id=snap.id, damaged=snap.damaged)
    info = pb.SnapshotInfo(
        id=snap.id, kind=snap.kind, name=snap.name, sandbox_id=snap.sandbox_id, notebook_path=snap.notebook_path,
        runtime=snap.runtime, runtime_version=snap.runtime_version, gpu_model=snap.gpu_model, created=snap.created,
        size=snap.size, files=[pb.SnapshotFileInfo(name=f.name, size=f.size, sha256=f.sha256) for f in snap.files],
        skipped=snap.skipped,
    )
    try:
        ParseDict(snap.spec, info.spec)
    except Exception as e:  # a catalog row edited into a spec that is no longer one
        return pb.SnapshotInfo(id=snap.id, damaged=f"catalog row's spec cannot be read: {e}"[:500])
    return info


class BackendService(pb_grpc.BackendServicer):
    def __init__(self, manager: SandboxManager, runtime_infos: Callable[[], list[RuntimeInfo]],
                 default_runtime: str, fanout: FanoutManager, restart_timeout: float = 60.0) -> None:
        self.manager = manager
        self.fanout = fanout
        self.runtime_infos = runtime_infos
        self.default_runtime = default_runtime
        self.restart_timeout = restart_timeout
        self.usage = UsageSampler()

    @_translate
    async def CreateSandbox(self, request: pb.CreateSandboxRequest, context: Ctx) -> pb.Sandbox:
        return await self.manager.create(request)

    @_translate
    async def GetSandbox(self, request: pb.GetSandboxRequest, context: Ctx) -> pb.Sandbox:
        return self.manager.get(request.id).record.to_pb()

    @_translate
    async def ListSandboxes(self, request: pb.ListSandboxesRequest, context: Ctx) -> pb.ListSandboxesResponse:
        return pb.ListSandboxesResponse(sandboxes=self.manager.list(request.all))

    @_translate
    async def DeleteSandbox(self, request: pb.DeleteSandboxRequest, context: Ctx) -> pb.DeleteSandboxResponse:
        await self.manager.delete(request.id)
        return pb.DeleteSandboxResponse()

    @_translate
    async def SignalKernel(self, request: pb.SignalKernelRequest, context: Ctx) -> pb.SignalKernelResponse:
        self.manager.signal_kernel(request.id, request.signal)
        return pb.SignalKernelResponse()

    @_translate
    async def RestartKernel(self, request: pb.RestartKernelRequest, context: Ctx) -> pb.Sandbox:
        return await self.manager.restart_kernel(request.id, self.restart_timeout)

    @_translate
    async def GetStatus(self, request: pb.GetStatusRequest, context: Ctx) -> pb.Status:
        gpus, driver, why = await asyncio.to_thread(inventory)
        infos = self.runtime_infos()
        return pb.Status(
            version=__version__,
            default_runtime=self.default_runtime,
            runtimes=[pb.Runtime(name=i.name, available=i.available, version=i.version, detail=i.detail)
                      for i in infos],
            gpus=[pb.Gpu(index=g.index, uuid=g.uuid, model=g.model, name=g.name,
                         memory_total=g.memory_total, memory_used=g.memory_used,
                         utilization=g.utilization) for g in gpus],
            capacity=self.manager.scheduler.capacity(),
            sandboxes=len(self.manager.list(include_ended=False)),
            gpu_detail=why,
            driver_version=driver,
        )

    @_translate
    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Ctx) -> pb.SnapshotInfo:
        return snapshot_info(await self.manager.snapshot(request))

    @_translate
    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: Ctx) -> pb.SnapshotInfo:
        snap = self.manager.snapshots.get(request.id)
        info = snapshot_info(snap)
        if snap.kind == "memory":
            info.kernel_key = memory.kernel_key(self.manager.snapshots.path(snap.id))
        return info

    @_translate
    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Ctx) -> pb.ListSnapshotsResponse:
        return pb.ListSnapshotsResponse(snapshots=[
            snapshot_info(s) for s in self.manager.snapshots.list(request.notebook_path or None)])

    @_translate
    async def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, context: Ctx) -> pb.DeleteSnapshotResponse:
        await asyncio.to_thread(self.manager.snapshots.delete, request.id)
        return pb.DeleteSnapshotResponse()

    @_translate
    async def HibernateSandbox(self, request: pb.HibernateSandboxRequest, context: Ctx) -> pb.Sandbox:
        return await self.manager.hibernate(request.id)

    @_translate
    async def WakeSandbox(self, request: pb.WakeSandboxRequest, context: Ctx) -> pb.Sandbox:
        return await self.manager.wake(request.id)

    @_translate
    async def GetSandboxUsage(self, request: pb.GetSandboxUsageRequest, context: Ctx) -> pb.SandboxUsage:
        sb = self.manager.get(request.id)
        usage = await asyncio.to_thread(self.usage.sample, sb.record.to_pb(), sb.spec.cpu, sb.spec.memory)
        runtime = self.manager.runtimes.get(sb.record.runtime)
        if runtime is not None and usage.processes:
            own = await asyncio.to_thread(runtime.memory_used, sb.record)
            if own is not None:
                usage.memory_used = own
        return usage

    async def WatchSandbox(self, request: pb.WatchSandboxRequest, context: Ctx) -> AsyncIterator[pb.SandboxEvent]:
        try:
            sb = self.manager.get(request.id)
        except SnapkernelError as e:
            await abort(context, e)
        queue: asyncio.Queue[pb.SandboxEvent | None] = asyncio.Queue()
        sb.watchers.add(queue)
        try:
            yield pb.SandboxEvent(sandbox=sb.record.to_pb())
            while (event := await queue.get()) is not None:
                yield event
        finally:
            sb.watchers.discard(queue)

    async def Attach(self, request_iterator: Any, context: Ctx) -> None:  # type: ignore[override]
        first = await context.read()
        if first is _EOF or first.WhichOneof("kind") != "open":
            await abort(context, InvalidSpecError("Attach: the first message must be `open` with a sandbox id"))
        try:
            sb = self.manager.get(check_sandbox_id(first.open.sandbox_id))
        except SnapkernelError as e:
            await abort(context, e)
        outgoing: asyncio.Queue[pb.KernelFrame | None] = asyncio.Queue()
        self.manager.attach(sb, outgoing)
        failure: list[SnapkernelError] = []

        async def pump_in() -> None:
            try:
                while (req := await context.read()) is not _EOF:
                    if req.WhichOneof("kind") != "frame":
                        raise InvalidSpecError("Attach: only frames may follow `open`")
                    check_client_frame(req.frame)
                    self.manager.send_to_agent(sb, pb.AgentMessage(frame=req.frame))
            except SnapkernelError as e:
                failure.append(e)
            finally:
                outgoing.put_nowait(None)

        reader = asyncio.create_task(pump_in())
        unsent: list[pb.KernelFrame] = []
        try:
            while (frame := await outgoing.get()) is not None:
                unsent.append(frame)  # until written: a client that breaks off may not have it
                await context.write(pb.AttachResponse(frame=frame))
                unsent.pop()
                self.manager.delivered(sb, frame.seq)
        finally:
            self.manager.detach(sb, outgoing, unsent)
            if not sb.attached:
                sb.detached_at = time.time()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if failure:
            log.warning("sandbox_id=%s Attach closed: %s", sb.record.id, failure[0])
            await abort(context, failure[0])

    async def Map(self, request_iterator: Any, context: Ctx) -> None:  # type: ignore[override]
        """A fan-out job of a caller outside any sandbox; the same `Job` as one relayed by a kernel's agent."""
        outgoing: asyncio.Queue[pb.MapResponse] = asyncio.Queue()
        job = self.fanout.new_job(outgoing.put_nowait, owner=None)

        async def pump_in() -> None:
            while (req := await context.read()) is not _EOF:
                await self.fanout.handle(job, req)

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
