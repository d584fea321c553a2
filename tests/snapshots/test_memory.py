"""Memory snapshots of live gvisor kernels, resumed in new sandboxes with every variable intact."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from snapkernel.client import BackendClient
from snapkernel.errors import SnapshotCorruptError, StateError
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec

on_gvisor = pytest.mark.parametrize("backend", [pytest.param("gvisor", marks=pytest.mark.gvisor)], indirect=True)


def backend_call(backend: Backend, fn):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        client = BackendClient(backend.address, backend.token)
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(go())


@on_gvisor
def test_live_snapshot_resumes_with_every_variable(backend: Backend, kernelspec_dir: Path) -> None:
    with running_kernel() as (_km, kc):
        run(kc, "import os, numpy\nstate = {'answer': 42, 'arr': numpy.arange(10)}\n"
                "open('notes.txt', 'w').write('kept')\nsandbox = os.environ['SNAPKERNEL_SANDBOX_ID']")
        sandbox = value(kc, "sandbox").strip("'")
        snap: pb.SnapshotInfo = backend_call(backend, lambda c: c.create_snapshot(sandbox, "memory", "first"))
        assert snap.id.startswith("snap-") and snap.kind == "memory" and snap.size > 1024**2
        assert {"sandbox.json", "workspace/notes.txt"} <= {f.name for f in snap.files}
        # The snapshot was live: the kernel goes on, and what it does next is not in the snapshot.
        run(kc, "state['answer'] = 43")
        assert value(kc, "state['answer']") == "43"
    listed = backend_call(backend, lambda c: c.list_snapshots())
    assert snap.id in [s.id for s in listed]
    resume = write_kernelspec(kernelspec_dir, "snapkernel-test-resume", {"restore_from": snap.id})
    with running_kernel(resume) as (_km, kc):
        assert value(kc, "state['answer']") == "42"
        assert value(kc, "int(state['arr'].sum())") == "45"
        assert value(kc, "open('notes.txt').read()") == "'kept'"
        assert value(kc, "1 + 1") == "2"
        # Resumed, it is the new sandbox's: its environment names this sandbox, not the one snapshotted.
        resumed = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        assert resumed != sandbox and resumed in [s.id for s in backend_call(backend, lambda c: c.list_sandboxes())]


@on_gvisor
def test_corrupt_snapshot_is_refused_and_kept(backend: Backend, kernelspec_dir: Path) -> None:
    with running_kernel() as (_km, kc):
        run(kc, "import os\nx = 1")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap = backend_call(backend, lambda c: c.create_snapshot(sandbox))
    image = next(f.name for f in snap.files if f.name.startswith("image/"))
    path = backend.state_dir / "snapshots" / snap.id / image
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    resume = write_kernelspec(kernelspec_dir, "snapkernel-test-resume-corrupt", {"restore_from": snap.id})
    with pytest.raises(Exception, match=f"file {image} fails its checksum"), running_kernel(resume):
        pass
    with pytest.raises(SnapshotCorruptError):
        backend_call(backend, lambda c: c.create_sandbox(pb.CreateSandboxRequest(
            spec=pb.SandboxSpec(restore_from=snap.id), kernel=pb.KernelConfig(key=b"k"))))
    assert snap.id in [s.id for s in backend_call(backend, lambda c: c.list_snapshots())]
    # The checksums are read while the image restores: the sandbox that had begun to restore is gone.
    assert [s.id for s in backend_call(backend, lambda c: c.list_sandboxes()) if s.spec.restore_from == snap.id] == []


@pytest.mark.parametrize("backend", ["process"], indirect=True)
def test_memory_snapshots_need_gvisor(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        run(kc, "import os")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        with pytest.raises(StateError, match="memory snapshots need the gvisor runtime"):
            backend_call(backend, lambda c: c.create_snapshot(sandbox))


@on_gvisor
def test_snapshot_commands(backend: Backend) -> None:
    from tests.test_cli import cli

    with running_kernel() as (_km, kc):
        run(kc, "import os")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        made = json.loads(cli("snapshots", "create", sandbox, "--name", "before-fit", "--json").stdout)
    assert made["id"].startswith("snap-") and made["kind"] == "memory" and made["name"] == "before-fit"
    assert "kernel_key" not in made
    listed = json.loads(cli("snapshots", "list", "--json").stdout)
    assert made["id"] in [s["id"] for s in listed]
    shown = json.loads(cli("snapshots", "show", made["id"], "--json").stdout)
    assert shown["size"] == made["size"] and "kernel_key" not in shown and shown["files"]
    assert made["id"] in cli("snapshots", "list").stdout
    assert f"removed {made['id']}" in cli("snapshots", "rm", made["id"]).stdout
    gone = cli("snapshots", "show", made["id"], check=False)
    assert gone.returncode == 2 and f"no snapshot '{made['id']}'" in gone.stderr
    bad = cli("snapshots", "create", sandbox, check=False)
    assert bad.returncode == 2 and f"no sandbox '{sandbox}'" in bad.stderr


@pytest.mark.gvisor
@pytest.mark.parametrize("own_backend", ["gvisor"], indirect=True)
def test_a_snapshot_restores_under_the_platform_it_was_taken_on(own_backend: Backend, kernelspec_dir: Path) -> None:
    """A systrap image dies under ptrace (the CPU default): restores use the platform the snapshot records."""
    own_backend.args = ["--BackendApp.platform=systrap"]
    own_backend.restart()
    with running_kernel() as (_km, kc):
        run(kc, "import os\nkept = 'from systrap'")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap = backend_call(own_backend, lambda c: c.create_snapshot(sandbox, "memory"))
    own_backend.args = []
    own_backend.restart()
    runtimes = backend_call(own_backend, lambda c: c.status()).runtimes
    assert "platform ptrace (systrap for GPU sandboxes)" in next(r.detail for r in runtimes if r.name == "gvisor")
    resume = write_kernelspec(kernelspec_dir, "snapkernel-test-resume-platform", {"restore_from": snap.id})
    with running_kernel(resume) as (_km, kc):
        assert value(kc, "kept") == "'from systrap'"
