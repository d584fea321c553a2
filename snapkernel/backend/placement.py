"""The placement seam: everything the gRPC service asks of wherever sandboxes run, in protocol messages only.

`LocalPlacement` (local_placement.py) is this host: its sandbox manager, snapshot store and fan-out. A
placement over several hosts (the cluster issue: Ray places each sandbox on a node and proxies to that node's
daemon) implements the same interface, so the service, the provisioner, REST and the CLI do not change.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable
from typing import Protocol

from snapkernel.protocol.v1 import backend_pb2 as pb


class Attachment(Protocol):
    """One client's hold on a sandbox's kernel channels (the Attach stream)."""

    outgoing: asyncio.Queue[pb.KernelFrame | None]  # kernel output for the client; None: it ended

    def send(self, frame: pb.KernelFrame) -> None:
        """A client frame (shell, control, stdin) for the kernel."""

    def delivered(self, seq: int) -> None:
        """Output `seq` reached the client: it need not be kept for it any longer."""

    def close(self, unsent: list[pb.KernelFrame]) -> None:
        """The client left; `unsent` it may not have had (kept for the next client)."""


class MapJob(Protocol):
    """One fan-out job of a caller outside any sandbox (the Map stream)."""

    async def handle(self, request: pb.MapRequest) -> None: ...

    def closed(self) -> None: ...


class Placement(ABC):
    @abstractmethod
    async def start(self, remove_leftovers: bool = False) -> int:
        """Take back the sandboxes a previous daemon left running (re-adopt them), or with `remove_leftovers`
        remove them (snapshots stay); then start the background work. Returns how many were removed."""

    @abstractmethod
    async def stop(self, remove_sandboxes: bool = False) -> int:
        """Stop the background work, and remove every sandbox or leave them running for the next daemon to
        re-adopt. Returns how many were removed."""

    @abstractmethod
    async def create(self, request: pb.CreateSandboxRequest) -> pb.Sandbox: ...

    @abstractmethod
    async def get(self, sandbox_id: str) -> pb.Sandbox: ...

    @abstractmethod
    async def list_sandboxes(self, include_ended: bool) -> list[pb.Sandbox]: ...

    @abstractmethod
    async def delete(self, sandbox_id: str) -> None: ...

    @abstractmethod
    def watch(self, sandbox_id: str) -> AsyncGenerator[pb.SandboxEvent, None]:
        """The sandbox as it is now, then each change; raises NotFoundError at once for an unknown id."""

    @abstractmethod
    async def attach(self, sandbox_id: str) -> Attachment: ...

    @abstractmethod
    async def signal(self, sandbox_id: str, signal: int) -> None: ...

    @abstractmethod
    async def restart(self, sandbox_id: str) -> pb.Sandbox: ...

    @abstractmethod
    async def hibernate(self, sandbox_id: str) -> pb.Sandbox: ...

    @abstractmethod
    async def wake(self, sandbox_id: str) -> pb.Sandbox: ...

    @abstractmethod
    async def move(self, request: pb.MoveSandboxRequest) -> pb.Sandbox: ...

    @abstractmethod
    async def usage(self, sandbox_id: str) -> pb.SandboxUsage: ...

    @abstractmethod
    async def export(self, sandbox_id: str) -> pb.SnapshotInfo:
        """A hibernated sandbox leaves this daemon as a snapshot (a cluster's front resumes it on another node)."""

    @abstractmethod
    async def create_snapshot(self, request: pb.CreateSnapshotRequest) -> pb.SnapshotInfo: ...

    @abstractmethod
    async def get_snapshot(self, snapshot_id: str) -> pb.SnapshotInfo:
        """With the kernel's session key for a memory snapshot (a resumed kernel keeps it)."""

    @abstractmethod
    async def list_snapshots(self, notebook_path: str) -> list[pb.SnapshotInfo]: ...

    @abstractmethod
    async def delete_snapshot(self, snapshot_id: str) -> None: ...

    @abstractmethod
    async def status(self) -> pb.Status:
        """Runtimes, GPUs, capacity and the number of sandboxes (the version is the service's to add)."""

    @abstractmethod
    def open_map(self, send: Callable[[pb.MapResponse], None]) -> MapJob: ...
