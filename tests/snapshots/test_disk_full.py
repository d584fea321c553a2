"""State snapshots on a nearly full disk: a real backend whose state dir is a 200 MiB tmpfs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapkernel.errors import NoCapacityError
from tests.conftest import RUNTIMES, Backend, _cleanup_sandboxes, sandbox_processes
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec
from tests.snapshots.test_memory import backend_call
from tests.snapshots.test_store import fill


@pytest.fixture(params=RUNTIMES)
def small_backend(request: pytest.FixtureRequest, kernelspec_dir: Path,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tempfile.TemporaryDirectory(prefix="snapkernel-full-") as tmp:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", tmp], check=True)
        b = Backend(Path(tmp), runtime=request.param)
        try:
            b.start()
            for k, v in b.env().items():
                monkeypatch.setenv(k, v)
            yield b
        finally:
            b.stop()
            b.report()
            _cleanup_sandboxes(b)
            subprocess.run(["umount", "--lazy", tmp], check=False)


def leftovers(backend: Backend) -> list[str]:
    """What a failed snapshot could have left: partial directories, state directories in workspaces."""
    return [str(p) for p in [*backend.state_dir.glob("snapshots/.partial-*"),
                             *backend.state_dir.glob("sandboxes/*/workspace/.snapkernel-state-*")]]


def test_a_state_snapshot_too_large_for_the_disk_is_refused_and_leaves_nothing(small_backend: Backend,
                                                                               kernelspec_dir: Path) -> None:
    spec = write_kernelspec(kernelspec_dir, f"snapkernel-test-full-{small_backend.runtime}", {"disk": "150Mi"})
    with running_kernel(spec) as (_km, kc):
        run(kc, "import os, numpy as np\nkept = 'small'")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        small = backend_call(small_backend, lambda c: c.create_snapshot(sandbox, "state", "small"))
        # 100 MiB fits the workspace (150Mi) but not twice (workspace, then store) in what the disk has left.
        run(kc, "big = np.ones(100 * 2**20, dtype=np.uint8)")
        free = shutil.disk_usage(small_backend.state_dir).free
        with pytest.raises(NoCapacityError, match=rf"sandbox {sandbox}: the state snapshot was not written: no "
                           r"space left on the state dir's file system: 1\d\d\.\dMi free, the snapshot needs "
                           r"200\.\dMi"):
            backend_call(small_backend, lambda c: c.create_snapshot(sandbox, "state"))
        assert leftovers(small_backend) == []
        assert shutil.disk_usage(small_backend.state_dir).free >= free - 4 * 2**20  # the space is given back
        assert [s.id for s in backend_call(small_backend, lambda c: c.list_snapshots())] == [small.id]
        # Past the workspace's quota: named as the quota.
        run(kc, "big = np.ones(160 * 2**20, dtype=np.uint8)")
        with pytest.raises(NoCapacityError, match=r"no space left in the sandbox's workspace: its disk quota is "
                           r"full \(.* free, the state snapshot needs 160\.\dMi\)"):
            backend_call(small_backend, lambda c: c.create_snapshot(sandbox, "state"))
        assert leftovers(small_backend) == []
        assert value(kc, "kept, big.nbytes") == f"('small', {160 * 2**20})"  # the kernel carries on
    # The earlier, intact snapshot still restores.
    resume = write_kernelspec(kernelspec_dir, f"snapkernel-test-full-resume-{small_backend.runtime}",
                              {"restore_from": small.id, "disk": "32Mi"})
    with running_kernel(resume) as (_km, kc):
        assert value(kc, "kept") == "'small'"


def test_listing_reading_and_deleting_snapshots_work_on_a_full_disk(small_backend: Backend,
                                                                    kernelspec_dir: Path) -> None:
    spec = write_kernelspec(kernelspec_dir, "snapkernel-test-full-list", {"disk": "32Mi"})
    with running_kernel(spec) as (_km, kc):
        run(kc, "import os\nx = 1")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        first = backend_call(small_backend, lambda c: c.create_snapshot(sandbox, "state"))
        second = backend_call(small_backend, lambda c: c.create_snapshot(sandbox, "state"))
        filler = small_backend.state_dir / "filler"
        fill(filler)
        with pytest.raises(NoCapacityError, match=rf"sandbox {sandbox}: the state snapshot was not written: no "
                           r"space left on the state dir's file system: 0 bytes free, the snapshot needs"):
            backend_call(small_backend, lambda c: c.create_snapshot(sandbox, "state"))
        assert leftovers(small_backend) == []
        assert value(kc, "x") == "1"  # the kernel carries on
    # Shut down on the full disk: the sandbox is stopped and gone all the same.
    assert sandbox_processes(sandbox) == []
    assert sandbox not in [s.id for s in backend_call(small_backend, lambda c: c.list_sandboxes())]
    small_backend.restart()  # a backend starting on the full disk
    assert {s.id for s in backend_call(small_backend, lambda c: c.list_snapshots())} == {first.id, second.id}
    assert backend_call(small_backend, lambda c: c.get_snapshot(first.id)).id == first.id
    backend_call(small_backend, lambda c: c.delete_snapshot(second.id))
    assert [s.id for s in backend_call(small_backend, lambda c: c.list_snapshots())] == [first.id]
    os.truncate(filler, filler.stat().st_size - 48 * 2**20)  # nearly full: a small restore fits
    resume = write_kernelspec(kernelspec_dir, "snapkernel-test-full-list-resume",
                              {"restore_from": first.id, "disk": "32Mi"})
    with running_kernel(resume) as (_km, kc):
        assert value(kc, "x") == "1"


@pytest.mark.parametrize("small_backend", ["process"], indirect=True)
def test_a_restore_into_a_too_small_workspace_names_its_quota(small_backend: Backend, kernelspec_dir: Path) -> None:
    with running_kernel(write_kernelspec(kernelspec_dir, "snapkernel-test-full-src", {"disk": "64Mi"})) as (_km, kc):
        run(kc, "import os, numpy as np\nbig = np.ones(24 * 2**20, dtype=np.uint8)")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        snap = backend_call(small_backend, lambda c: c.create_snapshot(sandbox, "state"))
    small = write_kernelspec(kernelspec_dir, "snapkernel-test-full-small", {"restore_from": snap.id, "disk": "16Mi"})
    with pytest.raises(Exception, match=r"no space left in the sandbox's workspace: its disk quota \(16Mi\) cannot "
                       rf"hold snapshot {snap.id}; ask for a larger `disk`"), running_kernel(small):
        pass
    assert leftovers(small_backend) == [] and not list(small_backend.state_dir.glob("sandboxes/*/workspace/.snap*"))
