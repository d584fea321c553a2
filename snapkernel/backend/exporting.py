"""A hibernated sandbox leaves its node (`ExportSandbox`): what it saved becomes a snapshot in the store, and the
sandbox goes. A cluster's front then resumes it on another node under the same id (cluster/ray_placement.py).

A memory image becomes a memory snapshot (the image, the sandbox's bundle and a copy of its workspace, as
`snapkernel snapshots create` writes one); saved variables become a state snapshot. It is uploaded to the
shared snapshot store, where the other node finds it. The files are copied, not moved: until the snapshot is
committed and uploaded the sandbox can still wake here, so a failure loses nothing.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.json_format import MessageToDict

from snapkernel.backend.hibernation import IMAGE_DIR, STATE_DIR
from snapkernel.backend.workspace import WORKSPACE
from snapkernel.errors import StateError
from snapkernel.protocol.states import STATE_NAMES
from snapkernel.protocol.v1 import backend_pb2 as pb
from snapkernel.snapshots import memory
from snapkernel.snapshots.store import Snapshot

if TYPE_CHECKING:
    from snapkernel.backend.sandboxes import SandboxManager


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


async def export_sandbox(manager: SandboxManager, sandbox_id: str) -> Snapshot:
    sb = manager.get(sandbox_id)
    r = sb.record
    if r.state != pb.HIBERNATED:
        raise StateError(f"sandbox {sandbox_id} is {STATE_NAMES[r.state]}: only a hibernated sandbox can leave its "
                         "node; hibernate it first")
    if r.hibernation not in ("memory", "state"):
        raise StateError(f"sandbox {sandbox_id} is suspended ({r.hibernation}): its kernel process stays on its "
                         "node and wakes there")
    if manager.shared.shared is None:
        raise StateError(f"sandbox {sandbox_id} cannot leave this node: it has no shared snapshot store for another "
                         "node to find it in (--BackendApp.snapshot_store)")
    workspace = Path(r.dir) / WORKSPACE
    meta = Snapshot(id="", kind=r.hibernation, name=f"handover-{sandbox_id}", sandbox_id=sandbox_id,
                    notebook_path=r.notebook_path, runtime=r.runtime)
    if r.hibernation == "memory":
        runtime = manager.runtimes[r.runtime]
        meta.spec = MessageToDict(r.spec, preserving_proto_field_name=True)
        meta.runtime_version = runtime.capabilities.version
        image = (Path(r.dir) / IMAGE_DIR).resolve()
        async with manager.snapshots.writing(meta, _size(image) + _size(workspace)) as d:
            await asyncio.to_thread(shutil.copytree, image, d, symlinks=True, dirs_exist_ok=True)
            await asyncio.to_thread(shutil.copytree, workspace, d / memory.WORKSPACE, symlinks=True)
    else:
        saved = workspace / STATE_DIR
        async with manager.snapshots.writing(meta, _size(saved)) as d:
            await asyncio.to_thread(shutil.copytree, saved, d, dirs_exist_ok=True)
    await manager.shared.publish(meta)  # where the node it resumes on finds it; fails here, the sandbox stays
    await manager.delete(sandbox_id)
    return meta
