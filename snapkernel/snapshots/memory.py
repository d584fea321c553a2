"""Memory snapshots: the exact image of a gvisor sandbox (`runsc checkpoint`), taken live, plus its
workspace files and OCI spec, so `runsc restore` can resume it in a new sandbox with every variable.

The layout of one in the store; the backend takes it (`backend/snapshotting.py`: it drives the runtime).

GPU memory (the CUDA checkpoint step before `runsc checkpoint`) is the hibernation issue's work.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

IMAGE = "image"  # runsc checkpoint's files
WORKSPACE = "workspace"  # the sandbox's workspace files as they were
BUNDLE = "sandbox.json"  # what the runtime saved of the sandbox (its OCI spec, the kernel's key)


def kernel_key(snapshot_dir: Path) -> bytes:
    """The Jupyter session key the snapshotted kernel signs with (a resumed kernel keeps it)."""
    return kernel_key_of(json.loads((snapshot_dir / BUNDLE).read_text()))


def kernel_key_of(saved: Any) -> bytes:
    """`kernel_key` of the runtime's saved bundle, already read (from the shared store, say)."""
    if "kernel_key" in saved:
        return str(saved["kernel_key"]).encode()
    for entry in saved["oci"]["process"]["env"]:  # images saved before the key was
        name, _, value = entry.partition("=")
        if name == "SNAPKERNEL_KERNEL_KEY":
            return str(value).encode()
    return b""


async def restore_workspace(snapshot_dir: Path, workspace: Path) -> None:
    """The workspace files as they were at the snapshot, for the restored sandbox."""
    await asyncio.to_thread(shutil.copytree, snapshot_dir / WORKSPACE, workspace, symlinks=True,
                            dirs_exist_ok=True)
