"""The shared snapshot store against a real S3-compatible server (`rclone serve s3`) and a shared directory:
push from one node's store, fetch into another's under the same id, tampering refused by object, bad URLs refused
by value."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapkernel.errors import (
    BackendUnavailableError,
    InvalidSpecError,
    NotFoundError,
    SnapshotCorruptError,
    StateError,
)
from snapkernel.snapshots.shared import CHUNK, SharedStore, bucket_problem, parse_url
from snapkernel.snapshots.store import Snapshot, SnapshotStore
from tests.snapshots.shared_fixtures import BUCKET, S3Server, free_port, s3_server

obstore = pytest.importorskip("obstore")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with tempfile.TemporaryDirectory(prefix="snapkernel-s3-") as tmp, s3_server(Path(tmp)) as server:
        yield server


@pytest.fixture(params=["s3", "file"])
def shared(request: pytest.FixtureRequest, s3: S3Server, tmp_path: Path) -> SharedStore:
    """A store of this test's own: a prefix of the S3 server's bucket, or a directory."""
    if request.param == "s3":
        return SharedStore.open(f"s3://{BUCKET}/{tmp_path.name}", s3.env())
    (tmp_path / "shared").mkdir()
    return SharedStore.open(f"file://{tmp_path / 'shared'}")


def objects_dir(shared: SharedStore, s3: S3Server) -> Path:
    """Where the store's objects lie on disk (what a tamperer behind the server's back changes)."""
    if shared.where.scheme == "s3":
        return s3.root / shared.where.bucket / shared.where.prefix
    return Path(shared.where.path)


def node(tmp_path: Path, name: str) -> SnapshotStore:
    return SnapshotStore(tmp_path / name / "snapshots")


def take(store: SnapshotStore, big: bool = False) -> Snapshot:
    meta = Snapshot(id="", kind="state", name="vars", sandbox_id="sb-0123456789ab", notebook_path="a.ipynb",
                    runtime="process", skipped={"lock": "cannot pickle"})
    with store.write(meta, expected_size=CHUNK * 2) as d:
        (d / "arr.npy").write_bytes(os.urandom(CHUNK + 12345 if big else 3000))  # past CHUNK: a multipart upload
        (d / "pickles").mkdir()
        (d / "pickles" / "table.pkl").write_bytes(b"pickled table")
    return meta


def test_pushed_snapshot_is_fetched_on_another_node_with_its_id_and_files(shared: SharedStore, s3: S3Server,
                                                                          tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    snap = take(a, big=True)
    assert shared.push(snap, a.path(snap.id)) is True
    assert shared.push(snap, a.path(snap.id)) is False  # there already: nothing sent
    assert [s.id for s in shared.list()] == [snap.id] and shared.get(snap.id) == snap
    got = shared.fetch(snap.id, b)
    assert got == snap and b.get(snap.id) == snap  # the same id and record on the second node
    assert b.verify(snap.id, "process") == snap  # the local store's own checks pass (manifest = catalog row)
    for f in snap.files:
        assert (b.path(snap.id) / f.name).read_bytes() == (a.path(snap.id) / f.name).read_bytes()
    assert json.loads((b.path(snap.id) / "manifest.json").read_text()) == json.loads(
        (a.path(snap.id) / "manifest.json").read_text())
    assert shared.fetch(snap.id, b) == snap  # cached: no second download
    assert not list(b.root.glob(".partial-*"))
    shared.delete(snap.id)
    assert shared.list() == []
    with pytest.raises(NotFoundError, match=f"no snapshot '{snap.id}'"):
        shared.get(snap.id)
    assert not [p for p in objects_dir(shared, s3).rglob("*") if p.is_file()]


@pytest.mark.parametrize("how", ["same size", "longer", "missing"])
def test_a_tampered_or_missing_object_is_refused_naming_it(shared: SharedStore, s3: S3Server, tmp_path: Path,
                                                           how: str) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    snap = take(a)
    shared.push(snap, a.path(snap.id))
    key = f"snapshots/{snap.id}/pickles/table.pkl"
    on_disk = objects_dir(shared, s3) / key
    if how == "same size":  # behind the server's back
        on_disk.write_bytes(b"PICKLED TABLE")
        expected = rf"object {key} fails its checksum: sha256 \w+…, the manifest records \w+…"
    elif how == "longer":  # through the S3 API (or the shared directory)
        obstore.put(shared.store, key, b"pickled table, and more")
        expected = f"object {key} has 23 bytes, the manifest records 13"
    else:
        obstore.delete(shared.store, key)
        expected = f"object {key} is missing"
    with pytest.raises(SnapshotCorruptError, match=expected):
        shared.fetch(snap.id, b)
    assert b.list() == [] and not list(b.root.glob(".partial-*")) and not b.path(snap.id).exists()


def test_a_snapshot_without_manifest_is_invisible(shared: SharedStore, tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    half, whole = take(a), take(a)
    shared.push(half, a.path(half.id))
    shared.push(whole, a.path(whole.id))
    obstore.delete(shared.store, f"snapshots/{half.id}/manifest.json")  # as a push cut short leaves it
    assert [s.id for s in shared.list()] == [whole.id]
    with pytest.raises(NotFoundError, match=half.id):
        shared.get(half.id)
    with pytest.raises(NotFoundError, match=half.id):
        shared.fetch(half.id, b)
    shared.delete(half.id)  # what is left of it can be removed
    with pytest.raises(NotFoundError):
        shared.delete(half.id)
    assert [s.id for s in shared.list()] == [whole.id]


def test_a_manifest_naming_paths_outside_is_refused(shared: SharedStore, tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    snap = take(a)
    shared.push(snap, a.path(snap.id))
    record = json.loads((a.path(snap.id) / "manifest.json").read_text())
    record["files"][0]["name"] = "../../escaped"
    obstore.put(shared.store, f"snapshots/{snap.id}/manifest.json", json.dumps(record).encode())
    with pytest.raises(SnapshotCorruptError, match=r"lists a file named '\.\./\.\./escaped'"):
        shared.fetch(snap.id, b)
    assert not (tmp_path / "escaped").exists() and b.list() == []
    with pytest.raises(InvalidSpecError, match=r"snapshot id '\.\./x' is not valid"):
        shared.get("../x")


def test_a_changed_local_file_or_a_link_is_not_pushed(shared: SharedStore, tmp_path: Path) -> None:
    a = node(tmp_path, "a")
    changed, linked = take(a), take(a)
    (a.path(changed.id) / "arr.npy").write_bytes(os.urandom(3000))
    with pytest.raises(SnapshotCorruptError, match=r"file arr\.npy no longer matches its record"):
        shared.push(changed, a.path(changed.id))
    target = a.path(linked.id) / "pickles" / "table.pkl"
    (tmp_path / "host-secret").write_bytes(b"pickled table")  # same bytes: only the link gives it away
    target.unlink()
    target.symlink_to(tmp_path / "host-secret")
    with pytest.raises(StateError, match=r"its file pickles/table\.pkl is a symbolic link"):
        shared.push(linked, a.path(linked.id))
    assert shared.list() == []


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://x", "snapshot_store 'ftp://x' is not valid: scheme ftp:// is not supported; use file:///"),
    ("/srv/snapshots", r"scheme \(none\) is not supported; use file:///absolute/dir .* or s3://bucket/prefix"),
    ("s3:///prefix", "snapshot_store 's3:///prefix' is not valid: it names no bucket"),
    ("s3://My_Bucket/p", "bucket name 'My_Bucket' breaks S3's naming rules: only lowercase letters"),
    ("s3://ab/p", "bucket name 'ab' breaks S3's naming rules: it has 2 characters, not 3 to 63"),
    ("s3://192.168.1.1/p", "it is formatted as an IP address"),
    ("s3://bucket/a/../b", r"prefix 'a/\.\./b' has an empty, '\.' or '\.\.' part"),
    ("file://relative/dir", "snapshot_store 'file://relative/dir' is not valid: the directory must be an absolute"),
    ("file:relative/dir", "the directory must be an absolute path"),
])
def test_bad_urls_are_refused_naming_them(url: str, message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        SharedStore.open(url, {})
    with pytest.raises(InvalidSpecError, match=message):
        parse_url(url)


def test_bucket_naming_rules() -> None:
    assert [n for n in ("abc", "my.bucket-1", "a" * 63) if bucket_problem(n)] == []
    assert all(bucket_problem(n) for n in ("a" * 64, "-abc", "abc-", "a..b", "xn--abc", "abc-s3alias", "ABC"))


def test_a_store_that_cannot_work_is_refused_at_open(s3: S3Server, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/p"
    with pytest.raises(InvalidSpecError, match=rf"wrong credentials for {url} at {s3.endpoint} \(listing its "
                                               r"snapshots\): .*SignatureDoesNotMatch.*; check AWS_ACCESS_KEY_ID/"
                                               "AWS_SECRET_ACCESS_KEY"):
        SharedStore.open(url, s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret"))
    with pytest.raises(InvalidSpecError, match=f"wrong credentials for {url} at {s3.endpoint}"):
        SharedStore.open(url, s3.env(AWS_ACCESS_KEY_ID="nobody-at-all"))
    with pytest.raises(InvalidSpecError, match=f"bucket 'no-such-bucket' of s3://no-such-bucket/p does not exist "
                                               f"at {s3.endpoint}: create it"):
        SharedStore.open("s3://no-such-bucket/p", s3.env())
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendUnavailableError, match=f"cannot reach the shared snapshot store {url} at {closed}"):
        SharedStore.open(url, s3.env(AWS_ENDPOINT_URL=closed))
    with pytest.raises(InvalidSpecError, match=r"AWS_ENDPOINT_URL 'minio:9000' .* is not valid"):
        SharedStore.open(url, s3.env(AWS_ENDPOINT_URL="minio:9000"))
    missing = tmp_path / "not-mounted"
    with pytest.raises(InvalidSpecError, match=f"snapshot_store 'file://{missing}': {missing} is not a directory"):
        SharedStore.open(f"file://{missing}")
