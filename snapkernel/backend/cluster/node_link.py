"""The front's gRPC link to one node's daemon: the same `Backend` API, with the node's token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from snapkernel.errors import from_grpc
from snapkernel.protocol.connection import GRPC_OPTIONS, call_metadata
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc


class NodeLink:
    def __init__(self, name: str, ray_node_id: str, address: str, token: str) -> None:
        self.name, self.ray_node_id, self.address = name, ray_node_id, address
        self.metadata = call_metadata(token)
        # A daemon that restarts is back within seconds: try again soon, not after gRPC's minutes of backoff.
        options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = pb_grpc.BackendStub(self.channel)
        self.alive = True
        self.message = ""  # why it is not alive
        self.status = pb.Status()  # its last answer to GetStatus
        self.unreachable_since = 0.0

    def describe(self) -> str:
        return f"node {self.name} ({self.address})"

    async def call(self, method: str, request: Any, timeout: float | None = 30.0) -> Any:
        """One unary call; a failure is the daemon's error, with the node named when it could not be reached."""
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            err = from_grpc(e, self.address)
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise type(err)(f"{self.describe()} did not answer: {err}") from e
            raise err from e

    async def watch(self, sandbox_id: str) -> AsyncIterator[pb.SandboxEvent]:
        call = self.stub.WatchSandbox(pb.WatchSandboxRequest(id=sandbox_id), metadata=self.metadata)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, self.address) from e
        finally:
            call.cancel()

    def attach(self) -> Any:
        return self.stub.Attach(metadata=self.metadata)  # type: ignore[call-arg]

    def map(self) -> Any:
        return self.stub.Map(metadata=self.metadata)  # type: ignore[call-arg]

    async def close(self) -> None:
        await self.channel.close(None)
