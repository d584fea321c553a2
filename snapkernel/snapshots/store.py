"""The snapshot store: one directory per snapshot plus one catalog row (SQLite) describing it.

Writes are atomic: files go into a `.partial-*` directory, are hashed and fsynced, and only then is the
directory renamed into place and the row inserted; partial directories left by a crash are discarded at
start-up. Every file's sha256 is recorded and checked before a restore; a snapshot that fails the check,
or that was written by an incompatible runtime, is refused with the file and the reason named. Nothing
here deletes or overwrites a good snapshot except an explicit `delete`.

The catalog is not trusted alone: each snapshot directory keeps its own copy of the record (`manifest.json`,
written with the files, before the rename), a restore is refused when the two disagree, and a directory
holding any file the record does not list is refused too (a restore only ever sees listed, verified files).
A catalog row that cannot be read is listed as damaged, with its id and what is wrong, never hiding the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snapkernel.errors import NoCapacityError, NotFoundError, SnapshotCorruptError, StateError
from snapkernel.protocol.kinds import check_snapshot_kind
from snapkernel.protocol.spec import check_snapshot_id, format_bytes

_PARTIAL = ".partial-"
MANIFEST = "manifest.json"  # the snapshot's own copy of its catalog record, in its directory
FORMAT = 1  # 0: written before snapshots kept a manifest (none to compare with)
FREE_SPACE_MARGIN = 256 * 1024**2  # left free beyond what a snapshot is expected to take (at most)
MARGIN_FRACTION = 20  # ... and at most 1/20 of the file system, so a small one can hold snapshots too


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT, SQLite's "database or disk is full", or a tool's (runsc's) "no space left on device"."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, sqlite3.OperationalError) and "full" in str(e):
        return True
    return isinstance(e, Exception) and "no space left on device" in str(e).lower()


@dataclass
class SnapshotFile:
    name: str  # relative to the snapshot's directory
    size: int
    sha256: str


@dataclass
class Snapshot:
    id: str
    kind: str
    name: str = ""
    sandbox_id: str = ""
    notebook_path: str = ""
    spec: dict[str, object] = field(default_factory=dict)
    runtime: str = ""
    runtime_version: str = ""
    gpu_model: str = ""
    created: float = 0.0
    files: list[SnapshotFile] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # state snapshots: variable -> why not saved
    format: int = 0
    damaged: str = ""  # set when the catalog row cannot be read: what is wrong with it (never stored)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def _data_files(root: Path) -> list[Path]:
    """The files of a snapshot's directory that its record lists (all but the manifest)."""
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.relative_to(root).as_posix() != MANIFEST]


def _record(meta: Snapshot) -> dict[str, object]:
    d = asdict(meta)
    d.pop("damaged", None)
    return d


def manifest_json(meta: Snapshot) -> str:
    """The snapshot's record as its manifest and catalog row hold it (and the shared store's manifest)."""
    return json.dumps(_record(meta))


def check_restorable(snap: Snapshot, runtime: str, runtime_version: str = "") -> None:
    """StateError unless `runtime` (at `runtime_version`, when given) can restore the snapshot."""
    if snap.kind == "memory" and (snap.runtime != runtime or
                                  (runtime_version and snap.runtime_version != runtime_version)):
        raise StateError(
            f"snapshot {snap.id} is a memory snapshot written by {snap.runtime} {snap.runtime_version}; "
            f"this backend restores with {runtime} {runtime_version}: use a state snapshot to move a "
            "kernel across runtimes"
        )


def _differences(catalog: dict[str, object], manifest: dict[str, object]) -> list[str]:
    """What differs between the catalog's record of a snapshot and its manifest, in words."""
    out = []
    for key in sorted(set(catalog) | set(manifest)):
        a, b = catalog.get(key), manifest.get(key)
        if a == b:
            continue
        if key == "files" and isinstance(a, list) and isinstance(b, list):
            fa = {f.get("name"): f for f in a if isinstance(f, dict)}
            fb = {f.get("name"): f for f in b if isinstance(f, dict)}
            out += [f"file {n} is in the manifest, not in the catalog" for n in sorted(set(fb) - set(fa), key=str)]
            out += [f"file {n} is in the catalog, not in the manifest" for n in sorted(set(fa) - set(fb), key=str)]
            out += [f"file {n} has size/sha256 {fa[n].get('size')}/{str(fa[n].get('sha256'))[:12]}… in the catalog, "
                    f"{fb[n].get('size')}/{str(fb[n].get('sha256'))[:12]}… in the manifest"
                    for n in sorted(set(fa) & set(fb), key=str) if fa[n] != fb[n]]
        else:
            out.append(f"{key} is {a!r} in the catalog, {b!r} in the manifest")
    return out


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Slow work (hashing, copying) runs in worker threads; the catalog is small and locked.
        self.db = sqlite3.connect(root / "catalog.db", isolation_level=None, check_same_thread=False)
        self.lock = threading.Lock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS snapshots (id TEXT PRIMARY KEY, notebook_path TEXT, "
                        "created REAL, body TEXT)")
        self.discard_partials()

    def path(self, snapshot_id: str) -> Path:
        return self.root / check_snapshot_id(snapshot_id)

    def discard_partials(self) -> list[str]:
        """Remove what an interrupted write left behind (a crash mid-snapshot); returns their names."""
        gone = []
        for d in self.root.glob(_PARTIAL + "*"):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d.name)
        return gone

    def free_space(self) -> int:
        """Bytes a snapshot may use here: what is free, less the margin kept free."""
        usage = shutil.disk_usage(self.root)
        return max(0, usage.free - min(FREE_SPACE_MARGIN, usage.total // MARGIN_FRACTION))

    def disk_full(self, needs: int) -> NoCapacityError:
        """The error that names a full disk: what is free and what the snapshot needs."""
        free = shutil.disk_usage(self.root).free
        return NoCapacityError(
            f"no space left on the state dir's file system: {format_bytes(free)} free at {self.root}, the "
            f"snapshot needs {format_bytes(needs)} (and a margin); delete snapshots (`snapkernel snapshots rm`) "
            "or free space"
        )

    def check_free_space(self, expected_size: int) -> None:
        if expected_size > self.free_space():
            raise self.disk_full(expected_size)

    def begin(self, meta: Snapshot, expected_size: int) -> Path:
        """Check kind and free space, give `meta` its id, and return the empty directory to fill."""
        check_snapshot_kind(meta.kind)
        self.check_free_space(expected_size)
        meta.id = f"snap-{secrets.token_hex(6)}"
        partial = self.root / f"{_PARTIAL}{meta.id}"
        partial.mkdir(mode=0o700)
        return partial

    def commit(self, meta: Snapshot, partial: Path) -> None:
        """Hash and fsync the files, move the directory into place, record it (slow: call off the loop)."""
        meta.files = [SnapshotFile(p.relative_to(partial).as_posix(), p.stat().st_size, sha256_file(p))
                      for p in _data_files(partial)]
        meta.created = time.time()
        meta.format = FORMAT
        body = manifest_json(meta)
        (partial / MANIFEST).write_text(body)
        _fsync_tree(partial)
        os.rename(partial, self.root / meta.id)
        try:
            with self.lock:
                self.db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)",
                                (meta.id, meta.notebook_path, meta.created, body))
        except BaseException:
            shutil.rmtree(self.root / meta.id, ignore_errors=True)  # not recorded: not kept
            raise

    def begin_adopt(self, snapshot_id: str, expected_size: int) -> Path:
        """The empty directory to receive a snapshot written elsewhere (another node's, from the shared store)
        that keeps its id; `adopt` commits it."""
        check_snapshot_id(snapshot_id)
        self.check_free_space(expected_size)
        partial = self.root / f"{_PARTIAL}{snapshot_id}-{secrets.token_hex(4)}"
        partial.mkdir(mode=0o700)
        return partial

    def adopt(self, meta: Snapshot, partial: Path) -> None:
        """Commit a snapshot written elsewhere under its own id and record, unchanged (slow: call off the loop).

        The caller has checked every file against the record's checksums; here the directory must hold exactly
        the files the record lists, with their sizes. Its manifest and catalog row are the record, as `commit`'s.
        """
        check_snapshot_kind(meta.kind)
        if self.has(meta.id):
            raise StateError(f"snapshot {meta.id} is already in this node's store")
        listed = {f.name: f.size for f in meta.files}
        found = {p.relative_to(partial).as_posix(): p.stat().st_size for p in _data_files(partial)}
        if found != listed:
            odd = sorted(set(found) ^ set(listed)) or sorted(n for n in listed if found[n] != listed[n])
            raise SnapshotCorruptError(f"snapshot {meta.id}: the files received are not those its record lists "
                                       f"({', '.join(odd[:5])}); it is not kept")
        body = manifest_json(meta)
        if meta.format >= 1:  # a format 0 snapshot never had one (`check` refuses one that appears)
            (partial / MANIFEST).write_text(body)
        _fsync_tree(partial)
        target = self.root / meta.id
        if target.exists():  # left by a crash between a rename and its catalog row: never recorded, not kept
            shutil.rmtree(target)
        os.rename(partial, target)
        try:
            with self.lock:
                self.db.execute("INSERT INTO snapshots VALUES (?, ?, ?, ?)",
                                (meta.id, meta.notebook_path, meta.created, body))
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def has(self, snapshot_id: str) -> bool:
        """Whether the catalog has a row for this id (readable or not)."""
        with self.lock:
            return self.db.execute("SELECT 1 FROM snapshots WHERE id = ?",
                                   (check_snapshot_id(snapshot_id),)).fetchone() is not None

    @staticmethod
    def abort(partial: Path) -> None:
        shutil.rmtree(partial, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def writing(self, meta: Snapshot, expected_size: int) -> AsyncIterator[Path]:
        """`write` for the event loop: the slow commit (hashing, fsync) runs in a worker thread."""
        partial = self.begin(meta, expected_size)
        try:
            yield partial
            await asyncio.to_thread(self.commit, meta, partial)
        except BaseException as e:
            self.abort(partial)
            if is_disk_full(e):
                raise self.disk_full(expected_size) from e
            raise

    @contextlib.contextmanager
    def write(self, meta: Snapshot, expected_size: int) -> Iterator[Path]:
        """Yield an empty directory to write the snapshot's files into; commit it when the block ends.

        `meta.id`, `created` and `files` are filled in here. On any error the partial directory is removed
        and nothing is recorded.
        """
        partial = self.begin(meta, expected_size)
        try:
            yield partial
            self.commit(meta, partial)
        except BaseException as e:
            self.abort(partial)
            if is_disk_full(e):
                raise self.disk_full(expected_size) from e
            raise

    def _row(self, snapshot_id: str) -> tuple[object, ...]:
        with self.lock:
            row = self.db.execute("SELECT id, body FROM snapshots WHERE id = ?",
                                  (check_snapshot_id(snapshot_id),)).fetchone()
        if row is None:
            raise NotFoundError(f"no snapshot {snapshot_id!r}; `snapkernel snapshots list` shows them")
        return tuple(row)

    def get(self, snapshot_id: str) -> Snapshot:
        """The snapshot's record; SnapshotCorruptError, naming what is wrong, when its row cannot be read."""
        snap = _from_row(*self._row(snapshot_id))
        if snap.damaged:
            raise SnapshotCorruptError(f"snapshot {snapshot_id} is damaged: {snap.damaged}; it will not be "
                                       f"restored (`snapkernel snapshots rm {snapshot_id}` removes it)")
        return snap

    def list(self, notebook_path: str | None = None) -> list[Snapshot]:
        """Newest first; with `notebook_path`, that notebook's snapshots first, then the rest.

        A row that cannot be read is listed too, as a Snapshot with only `id` and `damaged` set.
        """
        with self.lock:
            rows = self.db.execute("SELECT id, body FROM snapshots ORDER BY created DESC").fetchall()
        snaps = [_from_row(*r) for r in rows]
        if notebook_path is not None:
            snaps.sort(key=lambda s: s.notebook_path != notebook_path)
        return snaps

    def delete(self, snapshot_id: str) -> None:
        self._row(snapshot_id)  # a damaged row can be deleted too
        # The files first: on a full disk that gives SQLite the room it needs to record the delete. A crash
        # in between leaves a row whose files are missing: refused as such, and `delete` works again.
        shutil.rmtree(self.path(snapshot_id), ignore_errors=True)
        with self.lock:
            self.db.execute("DELETE FROM snapshots WHERE id = ?", (snapshot_id,))

    def verify(self, snapshot_id: str, runtime: str, runtime_version: str = "") -> Snapshot:
        """The snapshot, once every file matches its checksum and the runtime can restore it."""
        snap = self.check(snapshot_id, runtime, runtime_version)
        self.check_files(snap)
        return snap

    def check(self, snapshot_id: str, runtime: str, runtime_version: str = "") -> Snapshot:
        """The snapshot, once the runtime can restore it and its files are those its record lists, with their
        sizes (the quick part of `verify`: no file is read)."""
        snap = self.get(snapshot_id)
        check_restorable(snap, runtime, runtime_version)
        base = self.path(snapshot_id)
        self._check_manifest(snap, base)
        listed = {f.name for f in snap.files}
        unlisted = sorted(p.relative_to(base).as_posix() for p in _data_files(base)
                          if p.relative_to(base).as_posix() not in listed)
        if snap.format == 0 and (base / MANIFEST).is_file() and MANIFEST not in listed:
            unlisted.insert(0, MANIFEST)
        if unlisted:
            raise SnapshotCorruptError(
                f"snapshot {snapshot_id} holds file(s) its catalog record does not list: {', '.join(unlisted[:5])}"
                f"{' …' if len(unlisted) > 5 else ''}; it will not be restored"
            )
        for f in snap.files:
            path = base / f.name
            if not path.is_file():
                raise SnapshotCorruptError(f"snapshot {snapshot_id} is missing its file {f.name}; it will not be "
                                           "restored")
            if path.stat().st_size != f.size:
                raise SnapshotCorruptError(f"snapshot {snapshot_id}: file {f.name} fails its checksum: it has "
                                           f"{path.stat().st_size} bytes, its record {f.size}; it will not be restored")
        return snap

    def check_files(self, snap: Snapshot) -> None:
        """Every file of a `check`ed snapshot matches its checksum (reads them all)."""
        base = self.path(snap.id)
        for f in snap.files:
            try:
                actual = sha256_file(base / f.name)
            except OSError as e:
                raise SnapshotCorruptError(f"snapshot {snap.id}: file {f.name} cannot be read ({e}); it will not be "
                                           "restored") from e
            if actual != f.sha256:
                raise SnapshotCorruptError(
                    f"snapshot {snap.id}: file {f.name} fails its checksum (sha256 {actual[:12]}…, recorded "
                    f"{f.sha256[:12]}…); it will not be restored"
                )

    def _check_manifest(self, snap: Snapshot, base: Path) -> None:
        if snap.format == 0:
            return  # written before manifests were kept: the files are still checked one by one
        path = base / MANIFEST
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        except FileNotFoundError:
            raise SnapshotCorruptError(f"snapshot {snap.id} is missing its {MANIFEST}; it will not be "
                                       "restored") from None
        except (OSError, ValueError) as e:
            raise SnapshotCorruptError(f"snapshot {snap.id}: its {MANIFEST} cannot be read ({e}); it will not "
                                       "be restored") from None
        diffs = _differences(_record(snap), manifest)
        if diffs:
            raise SnapshotCorruptError(
                f"snapshot {snap.id}: the catalog and the snapshot's {MANIFEST} disagree: {'; '.join(diffs[:5])}"
                f"{' …' if len(diffs) > 5 else ''}; it will not be restored"
            )

    def close(self) -> None:
        self.db.close()


def snapshot_from_json(body: str | bytes) -> Snapshot:
    """The snapshot of a record (`manifest_json`'s); ValueError, TypeError or KeyError when it is not one."""
    d = json.loads(body)
    if not isinstance(d, dict):
        raise ValueError(f"the record is a JSON {type(d).__name__}, not an object")
    d.pop("damaged", None)
    d["files"] = [SnapshotFile(**f) for f in d["files"]]
    return Snapshot(**d)


def _from_row(row_id: object, body: object) -> Snapshot:
    """The snapshot of a catalog row; one with `damaged` saying what is wrong when the row cannot be read."""
    try:
        if not isinstance(body, str):
            raise ValueError(f"the record is {type(body).__name__}, not JSON text")
        snap = snapshot_from_json(body)
        if snap.id != row_id:
            raise ValueError(f"the record names {snap.id!r}, the row {row_id!r}")
        return snap
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        why = f"catalog row cannot be read: {type(e).__name__}: {e}"
        return Snapshot(id=str(row_id), kind="", damaged=why[:500])
