"""The catalog is not trusted alone: a real backend, its SQLite catalog edited behind its back."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from snapkernel.errors import SnapshotCorruptError
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec
from tests.snapshots.test_memory import backend_call


def edit_row(backend: Backend, snapshot_id: str, edit: Callable[[dict[str, Any]], None] | str) -> None:
    db = sqlite3.connect(backend.state_dir / "snapshots" / "catalog.db", isolation_level=None)
    try:
        if isinstance(edit, str):
            body = edit
        else:
            record = json.loads(db.execute("SELECT body FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()[0])
            edit(record)
            body = json.dumps(record)
        db.execute("UPDATE snapshots SET body = ? WHERE id = ?", (body, snapshot_id))
    finally:
        db.close()


def state_snapshot(backend: Backend, code: str) -> pb.SnapshotInfo:
    with running_kernel() as (_km, kc):
        run(kc, "import os\n" + code)
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap: pb.SnapshotInfo = backend_call(backend, lambda c: c.create_snapshot(sandbox, "state"))
    return snap


def resume(backend: Backend, snapshot_id: str) -> pb.Sandbox:
    result: pb.Sandbox = backend_call(backend, lambda c: c.create_sandbox(pb.CreateSandboxRequest(
        spec=pb.SandboxSpec(restore_from=snapshot_id), kernel=pb.KernelConfig(key=b"k"))))
    return result


def cli(backend: Backend, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "snapkernel.cli", *args], check=False, capture_output=True,
                          text=True, env={**os.environ, **backend.env()}, timeout=60)


@pytest.mark.parametrize("own_backend", ["process"], indirect=True)
def test_a_modified_file_dropped_from_the_catalog_is_not_restored(own_backend: Backend) -> None:
    snap = state_snapshot(own_backend, "secret = 'original'\nother = 1")
    d = own_backend.state_dir / "snapshots" / snap.id
    assert (d / "manifest.json").is_file() and "secret.pkl" in {f.name for f in snap.files}
    import cloudpickle

    (d / "secret.pkl").write_bytes(cloudpickle.dumps("modified"))
    edit_row(own_backend, snap.id, lambda r: r.update(files=[f for f in r["files"] if f["name"] != "secret.pkl"]))
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot {snap.id}: the catalog and the snapshot's "
                       r"manifest\.json disagree: file secret\.pkl is in the manifest, not in the catalog"):
        resume(own_backend, snap.id)
    # The manifest edited the same way: the directory still holds a file neither lists.
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["name"] != "secret.pkl"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot {snap.id} holds file\(s\) its catalog record does "
                       r"not list: secret\.pkl"):
        resume(own_backend, snap.id)


@pytest.mark.parametrize("own_backend", ["process"], indirect=True)
def test_catalog_and_manifest_that_disagree_are_refused(own_backend: Backend) -> None:
    snap = state_snapshot(own_backend, "x = 1")
    edit_row(own_backend, snap.id, lambda r: r.update(runtime="gvisor", sandbox_id="sb-000000000000"))
    with pytest.raises(SnapshotCorruptError, match=rf"snapshot {snap.id}: the catalog and the snapshot's "
                       r"manifest\.json disagree: runtime is 'gvisor' in the catalog, 'process' in the manifest; "
                       r"sandbox_id is 'sb-000000000000' in the catalog"):
        resume(own_backend, snap.id)


@pytest.mark.parametrize("own_backend", ["process"], indirect=True)
def test_an_unreadable_catalog_row_is_listed_as_damaged(own_backend: Backend, kernelspec_dir: Path) -> None:
    good = state_snapshot(own_backend, "x = 1")
    bad = state_snapshot(own_backend, "y = 2")
    edit_row(own_backend, bad.id, "{this is not json")
    for restart in (False, True):
        if restart:
            own_backend.restart()
        listed = {s.id: s for s in backend_call(own_backend, lambda c: c.list_snapshots())}
        assert listed[good.id].kind == "state" and not listed[good.id].damaged
        assert listed[bad.id].damaged.startswith("catalog row cannot be read: JSONDecodeError")
        out = cli(own_backend, "snapshots", "list")
        assert out.returncode == 0, out.stderr
        assert good.id in out.stdout and f"{bad.id}: damaged: catalog row cannot be read" in out.stdout
        as_json = json.loads(cli(own_backend, "snapshots", "list", "--json").stdout)
        assert {s["id"]: s["damaged"] for s in as_json}[good.id] == ""
        assert "JSONDecodeError" in {s["id"]: s["damaged"] for s in as_json}[bad.id]
    shown = cli(own_backend, "snapshots", "show", bad.id)
    assert shown.returncode != 0 and f"snapshot {bad.id} is damaged" in shown.stderr
    with pytest.raises(SnapshotCorruptError, match=f"snapshot {bad.id} is damaged"):
        resume(own_backend, bad.id)
    assert cli(own_backend, "snapshots", "rm", bad.id).returncode == 0  # and it can be removed
    assert [s.id for s in backend_call(own_backend, lambda c: c.list_snapshots())] == [good.id]
    spec = write_kernelspec(kernelspec_dir, "snapkernel-test-catalog-good", {"restore_from": good.id})
    with running_kernel(spec) as (_km, kc):  # the good one still restores
        assert value(kc, "x") == "1"
