"""The snapshot store on a real disk: atomic writes, checksums, compatibility, free space."""

from __future__ import annotations

import contextlib
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
    with pytest.raises(NoCapacityError, match=r"no space left on the state dir.s file system: .* the snapshot needs"), \
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


def _edit_row(tmp_path: Path, snapshot_id: str, edit: object) -> None:
    """Change a catalog row behind the store's back, as a damaged or tampered catalog would be."""
    import json
    import sqlite3

    db = sqlite3.connect(tmp_path / "catalog.db", isolation_level=None)
    try:
        if callable(edit):
            body = json.loads(db.execute("SELECT body FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()[0])
            edit(body)
            value = json.dumps(body)
        else:
            value = str(edit)
        db.execute("UPDATE snapshots SET body = ? WHERE id = ?", (value, snapshot_id))
    finally:
        db.close()


def test_the_snapshot_keeps_its_own_manifest(tmp_path: Path) -> None:
    import json

    store = SnapshotStore(tmp_path)
    snap = write_one(store)
    manifest = json.loads((tmp_path / snap.id / "manifest.json").read_text())
    assert manifest["id"] == snap.id and {f["name"] for f in manifest["files"]} == {"checkpoint.img",
                                                                                    "workspace/data.csv"}
    assert "manifest.json" not in {f.name for f in snap.files}


def test_a_file_dropped_from_the_catalog_row_is_not_restored(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = write_one(store)
    (tmp_path / snap.id / "workspace" / "data.csv").write_text("tampered\n")
    _edit_row(tmp_path, snap.id, lambda b: b.update(files=[f for f in b["files"] if f["name"] != "workspace/data.csv"]))
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot {snap.id}: the catalog and the snapshot's "
                       r"manifest\.json disagree: file workspace/data\.csv is in the manifest, not in the catalog"):
        store.verify(snap.id, "gvisor")
    # Even with the manifest edited the same way, the directory holds a file neither lists.
    import json

    manifest = json.loads((tmp_path / snap.id / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["name"] != "workspace/data.csv"]
    (tmp_path / snap.id / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot {snap.id} holds file\(s\) its catalog record does not "
                       r"list: workspace/data\.csv"):
        store.verify(snap.id, "gvisor")


def test_catalog_and_manifest_that_disagree_are_refused_naming_the_difference(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = write_one(store)
    _edit_row(tmp_path, snap.id, lambda b: b.update(runtime_version="9.9"))
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot {snap.id}: .*disagree: runtime_version is '9\.9' in "
                       r"the catalog, '0\.0~20240729\.0' in the manifest"):
        store.verify(snap.id, "gvisor")
    (tmp_path / snap.id / "manifest.json").unlink()
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot {snap.id} is missing its manifest\.json"):
        store.verify(snap.id, "gvisor")


def test_an_unreadable_catalog_row_is_listed_as_damaged_and_hides_nothing(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    good, bad = write_one(store), write_one(store, notebook="b.ipynb")
    _edit_row(tmp_path, bad.id, "{not json")
    for s in (store, SnapshotStore(tmp_path)):  # also after a restart
        listed = {x.id: x for x in s.list()}
        assert listed[good.id] == good
        assert listed[bad.id].damaged.startswith("catalog row cannot be read: JSONDecodeError")
        with pytest.raises(SnapshotCorruptError, match=rf"snapshot {bad.id} is damaged: catalog row cannot be read"):
            s.verify(bad.id, "gvisor")
    store.delete(bad.id)  # a damaged one can still be removed
    assert [x.id for x in store.list()] == [good.id] and not (tmp_path / bad.id).exists()


def test_snapshots_without_a_manifest_from_before_still_restore(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    snap = write_one(store)
    (tmp_path / snap.id / "manifest.json").unlink()
    _edit_row(tmp_path, snap.id, lambda b: b.pop("format"))
    assert store.verify(snap.id, "gvisor").format == 0


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 64 MiB tmpfs: a file system that fills up."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "small"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "--lazy", str(point)], check=False)


def fill(path: Path) -> None:
    """Write `path` until its file system has not a byte left."""
    import os
    import shutil

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1024**2, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"x" * chunk)
    finally:
        os.close(fd)
    assert shutil.disk_usage(path.parent).free == 0


def test_a_full_disk_is_named_and_what_was_written_is_given_back(small_fs: Path) -> None:
    import shutil

    store = SnapshotStore(small_fs / "snapshots")
    good = write_one(store)
    free = shutil.disk_usage(small_fs).free
    with pytest.raises(NoCapacityError, match=r"no space left on the state dir's file system: .* free at .*, the "
                       r"snapshot needs 100Mi"), store.write(Snapshot(id="", kind="state"), 100 * 1024**2):
        pass
    # A snapshot larger than it said it would be: ENOSPC mid-write is named too, and nothing is left.
    with pytest.raises(NoCapacityError, match=r"no space left on the state dir's file system"), \
            store.write(Snapshot(id="", kind="state"), 1024) as d, open(d / "big.npy", "wb") as f:
        for _ in range(80):
            f.write(b"x" * 1024**2)
    assert shutil.disk_usage(small_fs).free >= free - 1024**2
    assert [s.id for s in store.list()] == [good.id]
    assert not list((small_fs / "snapshots").glob(".partial-*"))


def test_reads_restores_and_deletes_work_on_a_full_disk(small_fs: Path) -> None:
    store = SnapshotStore(small_fs / "snapshots")
    first, second = write_one(store), write_one(store)
    fill(small_fs / "filler")
    reopened = SnapshotStore(small_fs / "snapshots")  # a restart on the full disk
    for s in (store, reopened):
        assert {x.id for x in s.list()} == {first.id, second.id}
        assert s.verify(first.id, "gvisor") == first
    reopened.delete(second.id)
    assert [x.id for x in store.list()] == [first.id]


def test_adopted_snapshot_keeps_its_id_and_record(tmp_path: Path) -> None:
    first, second = SnapshotStore(tmp_path / "a"), SnapshotStore(tmp_path / "b")
    snap = write_one(first)
    partial = second.begin_adopt(snap.id, snap.size)
    (partial / "checkpoint.img").write_bytes(b"x" * 1000)
    with pytest.raises(SnapshotCorruptError, match=f"snapshot {snap.id}: the files received are not those its "
                                                   r"record lists \(workspace/data.csv\)"):
        second.adopt(snap, partial)
    (partial / "workspace").mkdir()
    (partial / "workspace" / "data.csv").write_text("a,b\n")
    second.adopt(snap, partial)
    assert second.verify(snap.id, "gvisor", "0.0~20240729.0") == snap == first.get(snap.id)
    assert second.has(snap.id) and not list((tmp_path / "b").glob(".partial-*"))
    again = second.begin_adopt(snap.id, snap.size)
    with pytest.raises(StateError, match=f"snapshot {snap.id} is already in this node's store"):
        second.adopt(snap, again)
