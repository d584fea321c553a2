"""The snapshot store on a real disk: atomic writes, checksums, compatibility, free space."""

from __future__ import annotations

from pathlib import Path

import pytest

from snapkernel.errors import InvalidSpecError, NoCapacityError, NotFoundError, SnapshotCorruptError, StateError
from snapkernel.snapshots.store import Snapshot, SnapshotStore


def write_one(store: SnapshotStore, notebook: str = "a.ipynb", kind: str = "memory") -> Snapshot:
    meta = Snapshot(id="", kind=kind, sandbox_id="sb-0123456789ab", notebook_path=notebook, runtime="gvisor",
                    runtime_version="0.0~20240729.0")
    with store.write(meta, expected_size=1024) as d:
        (d / "checkpoint.img").write_bytes(b"x" * 1000)
        (d / "workspace").mkdir()
        (d / "workspace" / "data.csv").write_text("a,b\n")
    return meta


def test_written_snapshot_is_listed_with_sizes_and_checksums(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = write_one(store)
    got = store.get(snap.id)
    assert got == snap and got.size == 1004
    assert {f.name for f in got.files} == {"checkpoint.img", "workspace/data.csv"}
    assert all(len(f.sha256) == 64 for f in got.files)
    assert store.verify(snap.id, "gvisor", "0.0~20240729.0") == snap
    other = write_one(store, notebook="b.ipynb")
    assert [s.id for s in store.list("a.ipynb")] == [snap.id, other.id]
    assert [s.id for s in SnapshotStore(tmp_path).list()] == [other.id, snap.id]  # survives a reopen


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    meta = Snapshot(id="", kind="memory")
    with pytest.raises(RuntimeError), store.write(meta, expected_size=10) as d:
        (d / "half").write_bytes(b"x")
        raise RuntimeError("checkpoint failed")
    assert store.list() == []
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("catalog.db")) == []


def test_partial_directories_of_a_crash_are_discarded_at_start(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    good = write_one(store)
    (tmp_path / ".partial-snap-0000000000aa").mkdir()
    (tmp_path / ".partial-snap-0000000000aa" / "checkpoint.img").write_bytes(b"half")
    reopened = SnapshotStore(tmp_path)
    assert not list(tmp_path.glob(".partial-*"))
    assert [s.id for s in reopened.list()] == [good.id]


def test_corrupt_or_missing_files_are_refused_by_name(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = write_one(store)
    (tmp_path / snap.id / "workspace" / "data.csv").write_text("tampered\n")
    with pytest.raises(SnapshotCorruptError, match=r"file workspace/data.csv fails its checksum"):
        store.verify(snap.id, "gvisor")
    (tmp_path / snap.id / "checkpoint.img").unlink()
    with pytest.raises(SnapshotCorruptError, match=r"missing its file checkpoint\.img"):
        store.verify(snap.id, "gvisor")
    assert store.get(snap.id) == snap  # refused, never deleted


def test_memory_snapshot_of_another_runtime_is_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = write_one(store)
    with pytest.raises(StateError, match=r"written by gvisor 0\.0~20240729\.0; this backend restores with process"):
        store.verify(snap.id, "process")
    state = write_one(store, kind="state")
    assert store.verify(state.id, "process") == state  # state snapshots restore anywhere


def test_free_space_is_checked_before_writing(tmp_path: Path) -> None:
    import shutil

    store = SnapshotStore(tmp_path)
    too_big = shutil.disk_usage(tmp_path).free + 1024**4
    with pytest.raises(NoCapacityError, match="not enough disk space for a snapshot"), \
            store.write(Snapshot(id="", kind="memory"), expected_size=too_big):
        pass
    assert store.list() == []


def test_bad_ids_and_kinds(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    with pytest.raises(InvalidSpecError, match=r"snapshot id '\.\./etc' is not valid"):
        store.get("../etc")
    with pytest.raises(NotFoundError, match="no snapshot 'snap-0123456789ab'"):
        store.delete("snap-0123456789ab")
    with pytest.raises(InvalidSpecError, match="snapshot kind 'disk' is not known"), \
            store.write(Snapshot(id="", kind="disk"), expected_size=1):
        pass
    snap = write_one(store)
    store.delete(snap.id)
    assert store.list() == [] and not (tmp_path / snap.id).exists()
