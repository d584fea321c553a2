"""`LocalPlacement`: the placement (placement.py) of every sandbox on this host."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

from google.protobuf.json_format import ParseDict

from snapkernel.backend.exporting import export_sandbox
from snapkernel.backend.fanout import FanoutManager, Job
from snapkernel.backend.fanout_upstream import UpstreamRelay
from snapkernel.backend.orphans import OrphanReaper, remove_all
from snapkernel.backend.placement import Attachment, MapJob, Placement
from snapkernel.backend.runtimes.base import RuntimeInfo
from snapkernel.backend.sandbox import LiveSandbox
from snapkernel.backend.sandboxes import SandboxManager
from snapkernel.backend.usage import UsageSampler
from snapkernel.host.gpus import inventory
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots.store import Snapshot


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


class _LocalAttachment:
    def __init__(self, manager: SandboxManager, sb: LiveSandbox) -> None:
        self.manager, self.sb = manager, sb
        self.outgoing: asyncio.Queue[pb.KernelFrame | None] = asyncio.Queue()
        sb.attach(self.outgoing)

    def send(self, frame: pb.KernelFrame) -> None:
        self.manager.send_to_agent(self.sb, pb.AgentMessage(frame=frame))

    def delivered(self, seq: int) -> None:
        self.sb.delivered(seq)

    def close(self, unsent: list[pb.KernelFrame]) -> None:
        self.sb.detach(self.outgoing, unsent)
        if not self.sb.attached:
            self.sb.detached_at = time.time()


class _LocalMapJob:
    def __init__(self, fanout: FanoutManager, job: Job) -> None:
        self.fanout, self.job = fanout, job

    async def handle(self, request: pb.MapRequest) -> None:
        await self.fanout.handle(self.job, request)

    def closed(self) -> None:
        self.job.closed()


class LocalPlacement(Placement):

    def __init__(self, manager: SandboxManager, runtime_infos: Callable[[], list[RuntimeInfo]], default_runtime: str,
                 *, fanout_idle_timeout: float, orphan_timeout: float, restart_timeout: float = 60.0,
                 fanout_upstream: UpstreamRelay | None = None) -> None:
        self.manager = manager
        self.fanout = FanoutManager(manager, fanout_idle_timeout, fanout_upstream)
        self.orphans = OrphanReaper(manager, orphan_timeout)
        self.runtime_infos = runtime_infos
        self.default_runtime = default_runtime
        self.restart_timeout = restart_timeout
        self.sampler = UsageSampler()

    async def start(self, remove_leftovers: bool = False) -> int:
        await self.manager.readopt()
        removed = 0
        if remove_leftovers:
            removed = await remove_all(self.manager, "left by an earlier run that did not stop cleanly")
        await self.manager.start_templates()
        self.manager.pool.start()
        self.manager.hibernator.start()
        self.orphans.start()
        await self.fanout.start()
        return removed

    async def stop(self, remove_sandboxes: bool = False) -> int:
        await self.manager.pool.stop()  # first: it would refill with the room the kernels' removal frees
        await self.orphans.stop()
        await self.fanout.close()
        removed = 0
        if remove_sandboxes:
            await self.manager.hibernator.stop()  # no kernel starts going to sleep while they are removed
            # Jupyter shuts its kernels down before the backend stops; these are the ones it did not.
            removed = await remove_all(self.manager, "the backend is stopping (remove_on_stop)")
        await self.manager.close()
        return removed

    async def create(self, request: pb.CreateSandboxRequest) -> pb.Sandbox:
        return await self.manager.create(request)

    async def get(self, sandbox_id: str) -> pb.Sandbox:
        return self.manager.get(sandbox_id).record.to_pb()

    async def list_sandboxes(self, include_ended: bool) -> list[pb.Sandbox]:
        return self.manager.list(include_ended)

    async def delete(self, sandbox_id: str) -> None:
        await self.manager.delete(sandbox_id)

    def watch(self, sandbox_id: str) -> AsyncGenerator[pb.SandboxEvent, None]:
        sb = self.manager.get(sandbox_id)  # here, not in the generator: an unknown id fails the call at once

        async def events() -> AsyncGenerator[pb.SandboxEvent, None]:
            queue: asyncio.Queue[pb.SandboxEvent | None] = asyncio.Queue()
            sb.watchers.add(queue)
            try:
                yield pb.SandboxEvent(sandbox=sb.record.to_pb())
                while (event := await queue.get()) is not None:
                    yield event
            finally:
                sb.watchers.discard(queue)

        return events()

    async def attach(self, sandbox_id: str) -> Attachment:
        return _LocalAttachment(self.manager, self.manager.get(sandbox_id))

    async def signal(self, sandbox_id: str, signal: int) -> None:
        self.manager.signal_kernel(sandbox_id, signal)

    async def restart(self, sandbox_id: str) -> pb.Sandbox:
        return await self.manager.restart_kernel(sandbox_id, self.restart_timeout)

    async def hibernate(self, sandbox_id: str) -> pb.Sandbox:
        return await self.manager.hibernate(sandbox_id)

    async def wake(self, sandbox_id: str) -> pb.Sandbox:
        return await self.manager.wake(sandbox_id)

    async def move(self, request: pb.MoveSandboxRequest) -> pb.Sandbox:
        return await self.manager.move(request)

    async def usage(self, sandbox_id: str) -> pb.SandboxUsage:
        sb = self.manager.get(sandbox_id)
        usage = await asyncio.to_thread(self.sampler.sample, sb.record.to_pb(), sb.spec.cpu, sb.spec.memory)
        runtime = self.manager.runtimes.get(sb.record.runtime)
        if runtime is not None and usage.processes:
            own = await asyncio.to_thread(runtime.memory_used, sb.record)
            if own is not None:
                usage.memory_used = own
        return usage

    async def export(self, sandbox_id: str) -> pb.SnapshotInfo:
        return snapshot_info(await export_sandbox(self.manager, sandbox_id))

    async def create_snapshot(self, request: pb.CreateSnapshotRequest) -> pb.SnapshotInfo:
        snap = await self.manager.snapshot(request)
        await self.manager.shared.publish(snap)  # for every node: the call returns once it is there
        return snapshot_info(snap)

    async def get_snapshot(self, snapshot_id: str) -> pb.SnapshotInfo:
        snap, kernel_key = await self.manager.shared.get(snapshot_id)
        info = snapshot_info(snap)
        info.kernel_key = kernel_key
        return info

    async def list_snapshots(self, notebook_path: str) -> list[pb.SnapshotInfo]:
        return [snapshot_info(s) for s in await self.manager.shared.list(notebook_path or None)]

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.manager.shared.delete(snapshot_id)

    async def status(self) -> pb.Status:
        gpus, driver, why = await asyncio.to_thread(inventory)
        return pb.Status(
            default_runtime=self.default_runtime,
            runtimes=[pb.Runtime(name=i.name, available=i.available, version=i.version, detail=i.detail)
                      for i in self.runtime_infos()],
            gpus=[pb.Gpu(index=g.index, uuid=g.uuid, model=g.model, name=g.name, memory_total=g.memory_total,
                         memory_used=g.memory_used, utilization=g.utilization) for g in gpus],
            capacity=self.manager.scheduler.capacity(),
            sandboxes=len(self.manager.list(include_ended=False)),
            gpu_detail=why,
            driver_version=driver,
            templates=self.manager.templates.list(),
            warm_pool=self.manager.pool.to_pb(),
        )

    def open_map(self, send: Callable[[pb.MapResponse], None]) -> MapJob:
        return _LocalMapJob(self.fanout, self.fanout.new_job(send, owner=None))
