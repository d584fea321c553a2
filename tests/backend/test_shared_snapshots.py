"""Two real daemons (two "nodes", each its own state dir) sharing snapshots through one S3-compatible store
(`rclone serve s3`): a state snapshot taken on one resumes on the other with its variables; listings merge; a
delete on one is seen by the other; a store that cannot be used stops the daemon, saying why."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.conftest import Backend, _cleanup_sandboxes
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec
from tests.snapshots.shared_fixtures import BUCKET, S3Server, s3_server
from tests.snapshots.test_memory import backend_call


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with tempfile.TemporaryDirectory(prefix="snapkernel-s3-") as tmp, s3_server(Path(tmp)) as server:
        yield server


@contextlib.contextmanager
def node(store: str) -> Iterator[Backend]:
    """A process-runtime daemon of its own state dir on the shared store (its settings from the environment)."""
    with tempfile.TemporaryDirectory(prefix="snapkernel-node-") as tmp:
        b = Backend(Path(tmp), runtime="process", args=[f"--BackendApp.snapshot_store={store}"])
        b.start()
        try:
            yield b
        finally:
            b.stop()
            b.report()
            _cleanup_sandboxes(b)


def use(monkeypatch: pytest.MonkeyPatch, backend: Backend) -> None:
    """Kernels started from now on go to this daemon."""
    for k, v in backend.env().items():
        monkeypatch.setenv(k, v)


def ids(backend: Backend) -> list[str]:
    snaps: list[pb.SnapshotInfo] = backend_call(backend, lambda c: c.list_snapshots())
    return [s.id for s in snaps]


def test_a_snapshot_taken_on_one_daemon_resumes_on_another(s3: S3Server, kernelspec_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    with node(f"s3://{BUCKET}/resume") as a, node(f"s3://{BUCKET}/resume") as b:
        use(monkeypatch, a)
        with running_kernel() as (_km, kc):
            run(kc, "import os, numpy as np\ntable = {'rows': [1, 2, 3]}\narr = np.arange(6, dtype=np.int32)")
            sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
            snap: pb.SnapshotInfo = backend_call(a, lambda c: c.create_snapshot(sandbox, "state", "moved"))
        assert (s3.root / BUCKET / "resume" / "snapshots" / snap.id / "manifest.json").is_file()  # pushed
        assert ids(b).count(snap.id) == 1  # B lists what only the shared store has
        info: pb.SnapshotInfo = backend_call(b, lambda c: c.get_snapshot(snap.id))
        assert (info.kind, info.name, list(info.files)) == ("state", "moved", list(snap.files))
        assert not (b.state_dir / "snapshots" / snap.id).exists()  # answered from the manifest alone

        use(monkeypatch, b)
        resume = write_kernelspec(kernelspec_dir, "snapkernel-test-shared-resume", {"restore_from": snap.id})
        with running_kernel(resume) as (_km, kc):
            assert value(kc, "table") == "{'rows': [1, 2, 3]}"
            assert value(kc, "arr.dtype.name, int(arr.sum())") == "('int32', 15)"
        assert (b.state_dir / "snapshots" / snap.id / "manifest.json").is_file()  # in B's cache, the same id
        assert ids(b).count(snap.id) == 1 and ids(a).count(snap.id) == 1

        backend_call(a, lambda c: c.delete_snapshot(snap.id))
        assert snap.id not in ids(a)
        assert snap.id not in ids(b)  # deleted everywhere: B dropped its copy
        assert not (b.state_dir / "snapshots" / snap.id).exists()
        assert not (s3.root / BUCKET / "resume" / "snapshots" / snap.id).exists()


@pytest.mark.parametrize(("store", "env", "message"), [
    ("ftp://x", {}, "snapshot_store 'ftp://x' is not valid: scheme ftp:// is not supported; use file:///"),
    (f"s3://{BUCKET}/p", {"AWS_SECRET_ACCESS_KEY": "wrong-secret"},
     f"wrong credentials for s3://{BUCKET}/p at ENDPOINT"),
])
def test_a_store_that_cannot_be_used_stops_the_daemon(s3: S3Server, tmp_path: Path, store: str,
                                                      env: dict[str, str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "snapkernel.cli", "backend", "--runtime", "process",
                           "--state-dir", str(tmp_path), f"--BackendApp.snapshot_store={store}"],
                          env={**os.environ, **s3.env(**env)}, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message.replace("ENDPOINT", s3.endpoint) in proc.stderr
    assert not (tmp_path / "backend.sock").exists()


@pytest.mark.gvisor
def test_a_memory_snapshot_resumes_on_another_daemon_with_its_kernel_key(s3: S3Server, kernelspec_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    with node(f"s3://{BUCKET}/memory") as a, node(f"s3://{BUCKET}/memory") as b:
        use(monkeypatch, a)
        spec = write_kernelspec(kernelspec_dir, "snapkernel-test-shared-gvisor", {"runtime": "gvisor"})
        with running_kernel(spec) as (_km, kc):
            run(kc, "import os\nstate = {'answer': 42}\nopen('notes.txt', 'w').write('kept')")
            sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
            snap: pb.SnapshotInfo = backend_call(a, lambda c: c.create_snapshot(sandbox, "memory"))
        info: pb.SnapshotInfo = backend_call(b, lambda c: c.get_snapshot(snap.id))
        assert info.kernel_key and not (b.state_dir / "snapshots" / snap.id).exists()  # the bundle file alone
        use(monkeypatch, b)
        resume = write_kernelspec(kernelspec_dir, "snapkernel-test-shared-resume-memory",
                                  {"runtime": "gvisor", "restore_from": snap.id})
        with running_kernel(resume) as (_km, kc):
            assert value(kc, "state['answer']") == "42"
            assert value(kc, "open('notes.txt').read()") == "'kept'"
        backend_call(b, lambda c: c.delete_snapshot(snap.id))
        assert snap.id not in ids(a) and snap.id not in ids(b)
