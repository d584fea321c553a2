"""The client of the backend's gRPC API, used by the provisioner, the CLI and the server extension.

Finds the backend through SNAPKERNEL_BACKEND (address) and SNAPKERNEL_TOKEN (or the `token` file of the
default state dir). Every call carries the token; failures come back as `snapkernel.errors` exceptions.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from snapkernel.errors import from_grpc
from snapkernel.protocol.connection import GRPC_OPTIONS, call_metadata, default_address, default_token, grpc_target
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.protocol.v1 import backend_pb2_grpc as pb_grpc


class BackendClient:
    """One channel to the backend. Create and use it on one event loop (grpc.aio's rule)."""

    def __init__(self, address: str | None = None, token: str | None = None, tls_ca: str | None = None) -> None:
        self.address = address or default_address()
        target = grpc_target(self.address)
        self.token = token if token is not None else default_token(self.address)
        self.metadata = call_metadata(self.token)
        ca = tls_ca or os.environ.get("SNAPKERNEL_TLS_CA")
        # Subchannels of its own: grpc otherwise shares them process-wide, and a new client would inherit
        # the connect backoff of an old one to a backend that has since restarted.
        options = [*GRPC_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        if ca and not target.startswith("unix://"):
            creds = grpc.ssl_channel_credentials(Path(ca).read_bytes())
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.BackendStub(self.channel)

    async def _call(self, method: Any, request: Any, timeout: float | None = 30.0) -> Any:
        try:
            return await method(request, metadata=self.metadata, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            raise from_grpc(e, self.address) from e

    async def create_sandbox(self, request: pb.CreateSandboxRequest) -> pb.Sandbox:
        result: pb.Sandbox = await self._call(self.stub.CreateSandbox, request)
        return result

    async def get_sandbox(self, sandbox_id: str) -> pb.Sandbox:
        result: pb.Sandbox = await self._call(self.stub.GetSandbox, pb.GetSandboxRequest(id=sandbox_id))
        return result

    async def list_sandboxes(self, include_ended: bool = False) -> list[pb.Sandbox]:
        resp = await self._call(self.stub.ListSandboxes, pb.ListSandboxesRequest(all=include_ended))
        return list(resp.sandboxes)

    async def delete_sandbox(self, sandbox_id: str) -> None:
        await self._call(self.stub.DeleteSandbox, pb.DeleteSandboxRequest(id=sandbox_id), timeout=60.0)

    async def signal_kernel(self, sandbox_id: str, signum: int) -> None:
        await self._call(self.stub.SignalKernel, pb.SignalKernelRequest(id=sandbox_id, signal=signum))

    async def restart_kernel(self, sandbox_id: str) -> pb.Sandbox:
        result: pb.Sandbox = await self._call(self.stub.RestartKernel, pb.RestartKernelRequest(id=sandbox_id),
                                              timeout=90.0)
        return result

    async def hibernate_sandbox(self, sandbox_id: str) -> pb.Sandbox:
        result: pb.Sandbox = await self._call(self.stub.HibernateSandbox, pb.HibernateSandboxRequest(id=sandbox_id),
                                              timeout=None)
        return result

    async def wake_sandbox(self, sandbox_id: str) -> pb.Sandbox:
        result: pb.Sandbox = await self._call(self.stub.WakeSandbox, pb.WakeSandboxRequest(id=sandbox_id),
                                              timeout=None)
        return result

    async def move_sandbox(self, request: pb.MoveSandboxRequest) -> pb.Sandbox:
        result: pb.Sandbox = await self._call(self.stub.MoveSandbox, request, timeout=None)
        return result

    async def create_snapshot(self, sandbox_id: str, kind: str = "memory", name: str = "") -> pb.SnapshotInfo:
        result: pb.SnapshotInfo = await self._call(
            self.stub.CreateSnapshot, pb.CreateSnapshotRequest(sandbox_id=sandbox_id, kind=kind, name=name),
            timeout=600.0)
        return result

    async def get_snapshot(self, snapshot_id: str) -> pb.SnapshotInfo:
        result: pb.SnapshotInfo = await self._call(self.stub.GetSnapshot, pb.GetSnapshotRequest(id=snapshot_id))
        return result

    async def list_snapshots(self, notebook_path: str = "") -> list[pb.SnapshotInfo]:
        resp = await self._call(self.stub.ListSnapshots, pb.ListSnapshotsRequest(notebook_path=notebook_path))
        return list(resp.snapshots)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self._call(self.stub.DeleteSnapshot, pb.DeleteSnapshotRequest(id=snapshot_id))

    async def status(self) -> pb.Status:
        result: pb.Status = await self._call(self.stub.GetStatus, pb.GetStatusRequest())
        return result

    async def sandbox_usage(self, sandbox_id: str) -> pb.SandboxUsage:
        result: pb.SandboxUsage = await self._call(self.stub.GetSandboxUsage,
                                                   pb.GetSandboxUsageRequest(id=sandbox_id))
        return result

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
        """A bidirectional Attach call; write `AttachRequest(open=...)` first."""
        return self.stub.Attach(metadata=self.metadata)  # type: ignore[call-arg]  # read/write style call

    async def close(self) -> None:
        await self.channel.close(None)
