"""Memory snapshots: the exact image of a gvisor sandbox (`runsc checkpoint`), taken live, plus its
workspace files and OCI spec, so `runsc restore` can resume it in a new sandbox with every variable.

GPU memory (the CUDA checkpoint step before `runsc checkpoint`) is the hibernation issue's work.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from snapkernel.backend.runtimes.gvisor import GvisorRuntime
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.snapshots.store import Snapshot, SnapshotStore

IMAGE = "image"
WORKSPACE = "workspace"


async def take(store: SnapshotStore, runtime: GvisorRuntime, record: SandboxRecord, name: str,
               expected_size: int) -> Snapshot:
    """Checkpoint the running sandbox (it keeps running) into a new snapshot of the store."""
    meta = Snapshot(id="", kind="memory", name=name, sandbox_id=record.id, notebook_path=record.notebook_path,
                    spec=MessageToDict(record.spec, preserving_proto_field_name=True), runtime=runtime.name,
                    runtime_version=runtime.features.version)
    async with store.writing(meta, expected_size) as d:
        await runtime.checkpoint(record, d / IMAGE)
        await asyncio.to_thread(shutil.copytree, Path(record.dir) / WORKSPACE, d / WORKSPACE, symlinks=True)
        runtime.save_bundle(record, d)
    return meta


def kernel_key(snapshot_dir: Path) -> bytes:
    """The Jupyter session key the snapshotted kernel signs with (a resumed kernel keeps it)."""
    oci = json.loads((snapshot_dir / "sandbox.json").read_text())["oci"]
    for entry in oci["process"]["env"]:
        name, _, value = entry.partition("=")
        if name == "SNAPKERNEL_KERNEL_KEY":
            return str(value).encode()
    return b""


async def restore_workspace(snapshot_dir: Path, workspace: Path) -> None:
    """The workspace files as they were at the snapshot, for the restored sandbox."""
    await asyncio.to_thread(shutil.copytree, snapshot_dir / WORKSPACE, workspace, symlinks=True,
                            dirs_exist_ok=True)
