"""This node's snapshots together with the shared store (`--BackendApp.snapshot_store`), whose cache the node's
SnapshotStore becomes: a snapshot taken here is pushed once committed, one restored here that only the shared
store has is fetched first, listings merge both, and a delete removes it from both. Without a shared store,
the node's store alone, as before.

A node's copy of a shared snapshot is marked so (an empty file named by its id below `marks`): once another node
deletes it from the shared store, this node drops its copy when it next lists or resumes it. An unmarked one (a
fan-out clone's, or one whose push failed) is this node's own and stays.

The shared store's calls block (obstore's, hashing): they run in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from snapkernel.errors import BackendUnavailableError, NotFoundError, SnapkernelError
from snapkernel.protocol.spec import check_snapshot_id
from snapkernel.snapshots import memory
from snapkernel.snapshots.store import Snapshot, SnapshotStore, check_restorable

if TYPE_CHECKING:
    from snapkernel.snapshots.shared import SharedStore

log = logging.getLogger(__name__)


class SharedSnapshots:
    def __init__(self, local: SnapshotStore, shared: SharedStore | None, marks: Path) -> None:
        self.local = local
        self.shared = shared
        # Per store: a node pointed at another store keeps the copies of the first as its own.
        self.marks = marks / hashlib.sha256(shared.url.encode()).hexdigest()[:16] if shared is not None else marks
        if shared is not None:
            self.marks.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._fetching: dict[str, asyncio.Lock] = {}  # one download per snapshot, however many resume it

    def _mark(self, snapshot_id: str) -> None:
        (self.marks / check_snapshot_id(snapshot_id)).touch()

    def _marked(self, snapshot_id: str) -> bool:
        return (self.marks / check_snapshot_id(snapshot_id)).exists()

    def _unmark(self, snapshot_id: str) -> None:
        (self.marks / check_snapshot_id(snapshot_id)).unlink(missing_ok=True)

    def _gone_from_shared(self, snapshot_id: str) -> bool:
        """Whether this node's copy is of a shared snapshot another node deleted since; the copy is dropped then.
        (A shared store out of reach says nothing: the copy is kept and used.)"""
        if self.shared is None or not self._marked(snapshot_id):
            return False
        try:
            self.shared.get(snapshot_id)
            return False
        except NotFoundError:
            pass
        except BackendUnavailableError as e:
            log.warning("snapshot_id=%s using this node's copy: %s", snapshot_id, e)
            return False
        log.info("snapshot_id=%s was deleted from %s: removing this node's copy", snapshot_id, self.shared.url)
        with contextlib.suppress(NotFoundError):
            self.local.delete(snapshot_id)
        self._unmark(snapshot_id)
        return True

    async def publish(self, snap: Snapshot) -> None:
        """Push a snapshot just taken here (committed in the node's store) to the shared store."""
        if self.shared is None:
            return
        try:
            await asyncio.to_thread(self.shared.push, snap, self.local.path(snap.id))
        except SnapkernelError as e:
            raise type(e)(f"snapshot {snap.id} was written on this node but not to the {self.shared.name}: {e}; "
                          "it is kept on this node only") from e
        await asyncio.to_thread(self._mark, snap.id)

    async def ensure_local(self, snapshot_id: str, runtime: str, runtime_version: str) -> None:
        """Fetch a snapshot this node lacks from the shared store (once it is known to restore here: a memory
        image for another runtime is refused before its download)."""
        shared = self.shared
        if shared is None:
            return
        async with self._fetching.setdefault(snapshot_id, asyncio.Lock()):
            if await asyncio.to_thread(self._cached, snapshot_id):
                return  # here already (perhaps fetched by the resume this one waited for)
            snap = await asyncio.to_thread(shared.get, snapshot_id)
            check_restorable(snap, runtime, runtime_version)
            log.info("snapshot_id=%s fetching from %s (%d bytes)", snapshot_id, shared.url, snap.size)
            await asyncio.to_thread(shared.fetch, snapshot_id, self.local)
            await asyncio.to_thread(self._mark, snapshot_id)

    def _cached(self, snapshot_id: str) -> bool:
        return self.local.has(snapshot_id) and not self._gone_from_shared(snapshot_id)

    async def get(self, snapshot_id: str) -> tuple[Snapshot, bytes]:
        """The snapshot's record and, for a memory snapshot, its kernel's session key: the node's copy, else the
        shared store's manifest (nothing else of it is downloaded)."""
        def read() -> tuple[Snapshot, bytes]:
            if self.shared is None or self._cached(snapshot_id):
                snap = self.local.get(snapshot_id)
                key = memory.kernel_key(self.local.path(snap.id)) if snap.kind == "memory" else b""
                return snap, key
            snap = self.shared.get(snapshot_id)
            key = b""
            if snap.kind == "memory" and any(f.name == memory.BUNDLE for f in snap.files):
                key = memory.kernel_key_of(json.loads(self.shared.read_file(snap, memory.BUNDLE)))
            return snap, key

        return await asyncio.to_thread(read)

    async def list(self, notebook_path: str | None = None) -> list[Snapshot]:
        """The node's snapshots and the shared store's, each once, newest first (a notebook's own first)."""
        if self.shared is None:
            return await asyncio.to_thread(self.local.list, notebook_path)
        local, shared = await asyncio.gather(asyncio.to_thread(self.local.list),
                                             asyncio.to_thread(self.shared.list))
        there = {s.id for s in shared}
        # Asked again one by one before a copy goes: a listing may miss a snapshot pushed as it ran.
        gone = [s.id for s in local if s.id not in there and await asyncio.to_thread(self._gone_from_shared, s.id)]
        here = {s.id for s in local} - set(gone)
        snaps = sorted([*(s for s in local if s.id in here), *(s for s in shared if s.id not in here)],
                       key=lambda s: s.created, reverse=True)
        if notebook_path is not None:
            snaps.sort(key=lambda s: s.notebook_path != notebook_path)
        return snaps

    async def delete(self, snapshot_id: str) -> None:
        """Remove the snapshot from the shared store (first: every node stops seeing it) and from this node."""
        check_snapshot_id(snapshot_id)
        found = False
        if self.shared is not None:
            try:
                await asyncio.to_thread(self.shared.delete, snapshot_id)
                found = True
            except NotFoundError:
                pass
        try:
            await asyncio.to_thread(self.local.delete, snapshot_id)
        except NotFoundError:
            if not found:
                raise
        if self.shared is not None:
            await asyncio.to_thread(self._unmark, snapshot_id)
