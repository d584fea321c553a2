"""A cluster node's kernels fan out through the front: their `Map` streams go on to it unchanged but for the
workers' spec, which is the kernel's own as on one host (a kernel has no say in image, runtime or mounts), so
the front can spread the workers over every node. `--clone` jobs stay on the node: their clones restore the
kernel's memory image, which lives here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import grpc

from snapkernel.backend.sandbox import LiveSandbox
from snapkernel.backend.workers import worker_spec
from snapkernel.protocol.connection import GRPC_OPTIONS, call_metadata, grpc_target, read_token
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class _Relayed:
    def __init__(self, call: grpc.aio.StreamStreamCall,  # type: ignore[type-arg]
                 send: Callable[[pb.MapResponse], None]) -> None:
        self.call, self.send = call, send
        self.queue: asyncio.Queue[pb.MapRequest] = asyncio.Queue()  # written one at a time, in order
        self.reader = asyncio.ensure_future(self._read())
        self.writer = asyncio.ensure_future(self._write())

    async def _read(self) -> None:
        try:
            async for resp in self.call:
                self.send(resp)
                if resp.WhichOneof("kind") == "done":
                    return
        except grpc.aio.AioRpcError as e:
            self.send(pb.MapResponse(done=pb.MapDone(error=f"the cluster's front broke off the job: {e.details()}")))

    async def _write(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError):  # the reader tells how it ended
            while True:
                await self.call.write(await self.queue.get())

    def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        self.writer.cancel()


class UpstreamRelay:
    def __init__(self, address: str, token_file: str) -> None:
        self.address = grpc_target(address)
        self.metadata = call_metadata(read_token(Path(token_file)))
        self.channel: grpc.aio.Channel | None = None
        self.jobs: dict[tuple[str, int], _Relayed] = {}

    def takes(self, key: tuple[str, int], req: pb.MapRequest) -> bool:
        """Whether this stream's job goes to the front: it does unless it started here or is a --clone job."""
        if key in self.jobs:
            return True
        return req.WhichOneof("kind") == "start" and not req.start.clone

    def open(self, key: tuple[str, int], sb: LiveSandbox, req: pb.MapRequest,
             send: Callable[[pb.MapResponse], None]) -> None:
        if self.channel is None:
            self.channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
        call = pb_grpc.BackendStub(self.channel).Map(metadata=self.metadata)  # type: ignore[call-arg]
        job = self.jobs[key] = _Relayed(call, send)
        start = pb.MapRequest()
        start.CopyFrom(req)
        start.start.spec.CopyFrom(worker_spec(req.start.spec, sb))
        job.queue.put_nowait(start)
        log.info("sandbox_id=%s: fan-out job of %d worker(s) goes to the cluster's front at %s", sb.record.id,
                 req.start.workers, self.address)

    def forward(self, key: tuple[str, int], req: pb.MapRequest) -> None:
        self.jobs[key].queue.put_nowait(req)

    def closed(self, key: tuple[str, int]) -> None:
        job = self.jobs.pop(key, None)
        if job is not None:
            job.close()

    async def close(self) -> None:
        for job in self.jobs.values():
            job.close()
        self.jobs.clear()
        if self.channel is not None:
            await self.channel.close(None)
