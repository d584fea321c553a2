"""Snapshots of a running sandbox and the state restores of new ones: `state` snapshots (the kernel's variables,
saved by the kernel itself), `memory` snapshots (a checkpoint of the whole sandbox, by its runtime), and
loading saved variables into a fresh kernel (a resume from a state snapshot, or a wake)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf.json_format import MessageToDict

from snapkernel.backend import lifecycle
from snapkernel.backend.lifecycle import Activity
from snapkernel.backend.runtimes.base import RuntimeCapabilities, SandboxRuntime
from snapkernel.backend.sandbox import LiveSandbox
from snapkernel.backend.workspace import WORKSPACE
from snapkernel.errors import NoCapacityError, SandboxFailedError, SnapkernelError, StateError
from snapkernel.protocol.kinds import DEFAULT_SNAPSHOT_KIND, check_snapshot_kind
from snapkernel.protocol.spec import check_snapshot_name, format_bytes
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import memory, state
from snapkernel.snapshots.store import Snapshot, is_disk_full

if TYPE_CHECKING:
    from snapkernel.backend.shared_snapshots import SharedSnapshots
    from snapkernel.backend.workspace import Workspaces
    from snapkernel.snapshots.store import SnapshotStore

log = logging.getLogger(__name__)

STATE_TIMEOUT = 600.0  # seconds a state snapshot's save or load may take in the kernel


class SnapshotHost(Protocol):
    """What snapshots use of the sandbox manager (sandboxes.py), and all they use."""

    runtimes: dict[str, SandboxRuntime]
    snapshots: SnapshotStore
    shared: SharedSnapshots
    workspaces: Workspaces

    def get(self, sandbox_id: str) -> LiveSandbox: ...

    def set_state(self, sb: LiveSandbox, state: int, message: str | None = None,
                  progress: pb.Progress | None = None) -> None: ...

    def progress(self, sb: LiveSandbox, step: str, message: str, fraction: float = -1.0) -> None: ...

    def notify(self, sb: LiveSandbox, progress: pb.Progress | None = None) -> None: ...

    def state_name(self, sb: LiveSandbox) -> str: ...

    async def run_in_kernel(self, sb: LiveSandbox, code: str, timeout: float) -> pb.CodeResult: ...


def _load_report(output: str) -> dict[str, Any]:
    """What `state.load` printed last: {"restored", "failed", "skipped_at_snapshot"} ({} if it did not come)."""
    lines = output.strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


class Snapshotter:
    def __init__(self, manager: SnapshotHost) -> None:
        self.m = manager

    async def on_kernel_request(self, sb: LiveSandbox, request: pb.KernelRequest) -> None:
        """`%snapshot` in the kernel."""
        try:
            snap = await self.snapshot(pb.CreateSnapshotRequest(sandbox_id=sb.record.id, kind=request.kind,
                                                                name=request.name))
            await self.m.shared.publish(snap)
            log.info("sandbox_id=%s %%snapshot took %s", sb.record.id, snap.id)
        except SnapkernelError as e:
            self.m.progress(sb, "snapshot", f"%snapshot failed: {e}")

    async def load_state(self, sb: LiveSandbox) -> None:
        """Put saved variables into the fresh kernel (a resume from a state snapshot, or a wake)."""
        r = sb.record
        inside = sb.restore_state
        assert inside is not None
        host = Path(r.dir) / WORKSPACE / inside
        waking = r.state in (pb.WAKING, pb.MOVING)  # the waker (or mover) says how it went
        self.m.progress(sb, "restore", "loading the kernel's variables", 0.8)
        try:
            if sb.restore_source is not None:
                try:
                    await asyncio.to_thread(shutil.copytree, sb.restore_source, host)
                except (OSError, shutil.Error) as e:
                    if not is_disk_full(e):
                        raise SandboxFailedError(f"the snapshot's files could not be copied in: {e}") from e
                    if os.path.ismount(Path(r.dir) / WORKSPACE):
                        raise NoCapacityError(
                            f"no space left in the sandbox's workspace: its disk quota "
                            f"({format_bytes(sb.spec.disk)}) cannot hold snapshot {sb.spec.restore_from}; ask for "
                            "a larger `disk`") from e
                    raise self.m.snapshots.disk_full(sum(f.stat().st_size for f in sb.restore_source.rglob("*")
                                                       if f.is_file())) from e
                await asyncio.to_thread(self.m.workspaces.give, host, self.m.runtimes[r.runtime].owner(sb.spec))
            result = await self.m.run_in_kernel(sb, state.load_code(inside), STATE_TIMEOUT)
            if not result.ok:
                raise SandboxFailedError(f"loading the saved variables failed: {result.error}")
            failed = _load_report(result.output).get("failed") if sb.whole_state else None
            if failed:  # a move goes back rather than lose a variable
                names = ", ".join(f"{k} ({v})" for k, v in sorted(failed.items())[:5])
                raise SandboxFailedError(f"these variables could not be loaded in the new sandbox: {names}")
        except SnapkernelError as e:
            sb.state_error = str(e)
            if not waking:
                self.m.set_state(sb, pb.FAILED, str(e))
            return
        finally:
            if not sb.record.relaunching:
                await asyncio.to_thread(shutil.rmtree, host, True)
            sb.restore_state = sb.restore_source = None
            self.m.notify(sb)
        if not waking:
            self.m.set_state(sb, pb.RUNNING, "", pb.Progress(step="restore", message=result.output.strip(),
                                                            fraction=1.0))

    async def save_state(self, sb: LiveSandbox, inside: str, into_store: bool = False) -> dict[str, Any]:
        """Save the kernel's variables into `inside` (a directory of its workspace); returns the report.

        The kernel checks the size first, against its workspace and what the host can give: a workspace of
        its own (a sparse image) takes host space as it fills, and `into_store` files are copied once more.
        """
        mounted = os.path.ismount(Path(sb.record.dir) / WORKSPACE)
        host_free = self.m.snapshots.free_space() if into_store or mounted else None
        copies = (2 if mounted else 1) if into_store else 1
        result = await self.m.run_in_kernel(sb, state.save_code(inside, host_free, copies), STATE_TIMEOUT)
        if not result.ok:
            if state.NO_SPACE in result.error:
                why = result.error[result.error.index(state.NO_SPACE):]
                raise NoCapacityError(f"sandbox {sb.record.id}: the state snapshot was not written: {why}")
            raise SandboxFailedError(f"saving the kernel's variables failed: {result.error}")
        lines = result.output.strip().splitlines()
        if lines and lines[-1].startswith("{"):
            report: dict[str, Any] = json.loads(lines[-1])
            return report
        # The printed report did not come back (seen under gVisor): the saved index says the same.
        index = json.loads((Path(sb.record.dir) / WORKSPACE / inside / state.MANIFEST).read_text())
        return {"saved": sum(len(index[k]) for k in ("arrays", "pickles", "modules")), "skipped": index["skipped"]}

    async def _take_state(self, sb: LiveSandbox, name: str) -> Snapshot:
        r = sb.record
        inside = f".snapkernel-state-{secrets.token_hex(4)}"
        host = Path(r.dir) / WORKSPACE / inside
        try:
            report = await self.save_state(sb, inside, into_store=True)
            size = sum(p.stat().st_size for p in host.rglob("*") if p.is_file())
            meta = Snapshot(id="", kind="state", name=name, sandbox_id=r.id, notebook_path=r.notebook_path,
                            runtime=r.runtime, skipped=report["skipped"])
            async with self.m.snapshots.writing(meta, size) as partial:
                # A rename where the workspace is a plain directory; a copy where it has its own file system.
                for entry in list(host.iterdir()):
                    await asyncio.to_thread(shutil.move, entry, partial / entry.name)
            return meta
        finally:
            await asyncio.to_thread(shutil.rmtree, host, True)

    async def _take_memory(self, sb: LiveSandbox, runtime: SandboxRuntime, name: str) -> Snapshot:
        """Checkpoint the running sandbox (it keeps running) into a new memory snapshot of the store."""
        r = sb.record
        meta = Snapshot(id="", kind="memory", name=name, sandbox_id=r.id, notebook_path=r.notebook_path,
                        spec=MessageToDict(r.spec, preserving_proto_field_name=True), runtime=runtime.name,
                        runtime_version=runtime.capabilities.version)
        async with self.m.snapshots.writing(meta, sb.spec.memory) as d:
            await runtime.checkpoint(r, d / memory.IMAGE)
            await asyncio.to_thread(shutil.copytree, Path(r.dir) / WORKSPACE, d / memory.WORKSPACE, symlinks=True)
            runtime.save_bundle(r, d)
        return meta

    async def snapshot(self, req: pb.CreateSnapshotRequest) -> Snapshot:
        check_snapshot_name(req.name)
        sb = self.m.get(req.sandbox_id)
        kind = check_snapshot_kind(req.kind or DEFAULT_SNAPSHOT_KIND)
        runtime = self.m.runtimes.get(sb.record.runtime)
        caps = runtime.capabilities if runtime is not None else RuntimeCapabilities()
        if kind == "memory" and not caps.memory_snapshots:
            raise StateError(f"sandbox {sb.record.id} runs under {sb.record.runtime}: memory snapshots need the "
                             "gvisor runtime; use --kind state")
        if kind == "memory" and sb.record.gpu_indices and not caps.gpu_checkpoint:
            raise StateError(f"sandbox {sb.record.id} has GPUs and runsc {caps.version} cannot put GPU "
                             "memory into its checkpoints (builds with --cuda-checkpoint-path can); use --kind state")
        if sb.record.state != pb.RUNNING:
            raise lifecycle.refuse(sb.record.id, "snapshot", self.m.state_name(sb),
                                   "only a running kernel can be snapshotted")
        with sb.doing(Activity.SNAPSHOTTING, "snapshot", "wait for that one to finish"):
            if kind == "state":
                self.m.progress(sb, "snapshot", "saving the kernel's variables", 0.2)
                snap = await self._take_state(sb, req.name)
            else:
                assert runtime is not None  # memory snapshots were refused above without it
                self.m.progress(sb, "snapshot", "checkpointing the sandbox's memory", 0.2)
                snap = await self._take_memory(sb, runtime, req.name)
        self.m.progress(sb, "snapshot", f"snapshot {snap.id} written ({format_bytes(snap.size)})", 1.0)
        return snap
