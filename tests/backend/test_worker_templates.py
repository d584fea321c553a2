"""Worker templates on a real gvisor backend: cold fan-out workers restore a memory image of a booted worker,
each then as its own sandbox; a damaged worker template is rebuilt and never fails a fan-out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snapkernel.backend.workers import is_worker
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.backend.test_templates import full_log, sandbox_id, templates, wait_ready
from tests.conftest import Backend, backend_of_its_own
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec
from tests.snapshots.test_memory import backend_call

pytestmark = pytest.mark.gvisor

WORKER_CLASS = "fan-out worker, cpu 1, memory 4Gi, disk 10Gi"  # the workers of a kernel of the default spec


@pytest.fixture
def wbackend(monkeypatch: pytest.MonkeyPatch, kernelspec_dir: Path) -> Iterator[Backend]:
    """A gvisor backend with templates on (no warm pool): the default kernel's and worker's are built at start."""
    write_kernelspec(kernelspec_dir, "snapkernel-test-template", {"runtime": "gvisor"})
    with backend_of_its_own("gvisor", monkeypatch, args=["--BackendApp.templates=True",
                                                         "--BackendApp.warm_pool=0"]) as b:
        yield b


def workers(backend: Backend) -> list[pb.Sandbox]:
    return [s for s in backend_call(backend, lambda c: c.list_sandboxes()) if is_worker(s.spec)]


def remove_workers(backend: Backend) -> None:
    """No warm worker left: the next fan-out is a cold one."""
    async def rm(client: Any) -> None:
        for w in listed:
            await client.delete_sandbox(w.id)

    listed = workers(backend)
    backend_call(backend, rm)
    assert workers(backend) == []


def wait_running(backend: Backend, count: int, timeout: float = 60) -> list[pb.Sandbox]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [w for w in workers(backend) if w.state == pb.RUNNING]
        if len(running) >= count:
            return running
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} workers running: {workers(backend)}")


def test_cold_workers_restore_the_worker_template_each_as_its_own_sandbox(wbackend: Backend) -> None:
    from snapkernel.fanout import remote

    template = wait_ready(wbackend, mode="worker")
    key = template["key"]
    assert template["spec"] == WORKER_CLASS and template["mode"] == "worker"
    assert int(str(template["size"])) > 1 << 20
    assert [t["mode"] for t in templates(wbackend, mode=None)].count("kernel") == 1  # and the kernel's own

    @remote(workers=4, progress=False)
    def where(x: int) -> tuple[str, int]:
        import os
        import time

        time.sleep(0.05)  # long enough for every worker to get items
        return os.environ["SNAPKERNEL_SANDBOX_ID"], x * 2

    out = where.map(range(120))
    assert [v for _, v in out] == [x * 2 for x in range(120)]  # in order
    seen = {sid for sid, _ in out}
    assert seen == {w.id for w in workers(wbackend)} and len(seen) == 4  # each worker as its own sandbox
    log = full_log(wbackend)
    for sid in seen:
        assert f"sandbox_id={sid} restored from worker template {key}" in log, log[-3000:]
        assert f"sandbox_id={sid} sandbox: starting a gvisor sandbox" not in log  # not booted
    assert [t["used"] for t in templates(wbackend, mode="worker")] == ["4"]

    # Large payloads travel as files in a restored worker's workspace, both ways.
    @remote(workers=1, progress=False)
    def twice(data: bytes) -> bytes:
        return data * 2

    big = os.urandom(5 << 20)
    assert twice.map([big]) == [big * 2]

    status = subprocess.run([sys.executable, "-m", "snapkernel.cli", "status"], capture_output=True, text=True,
                            check=True, env={**os.environ, **wbackend.env()}).stdout
    assert re.search(rf"{key}  {WORKER_CLASS}: ready, built .* ago, [\d.]+Mi, 4 workers from it", status), status


def test_a_cold_fanout_cell_restores_its_workers(wbackend: Backend) -> None:
    """The issue's case: `%%fanout --workers 4` in a gvisor kernel with no warm worker."""
    key = wait_ready(wbackend, mode="worker")["key"]
    with running_kernel("snapkernel-test-template") as (_km, kc):
        kernel = sandbox_id(kc)
        content, _ = run(kc, "%%fanout --over range(4) --as x --workers 4 --out res\nx * 2", timeout=120)
        assert content["status"] == "ok", content
        assert value(kc, "res") == "[0, 2, 4, 6]"
        ids = {w.id for w in wait_running(wbackend, 4)}
        remove_workers(wbackend)  # cold again: the next cell restores 4 new ones
        content, _ = run(kc, "%%fanout --over range(8) --as x --workers 4 --out res\nx * 2", timeout=120)
        assert content["status"] == "ok", content
        assert value(kc, "res") == str([x * 2 for x in range(8)])
        ids |= {w.id for w in wait_running(wbackend, 4)}
    log = full_log(wbackend)
    started = set(re.findall(rf"sandbox_id=(sb-\w+) fan-out worker started for owner={kernel}", log))
    assert started == ids and len(ids) == 8
    restored = set(re.findall(rf"sandbox_id=(sb-\w+) restored from worker template {key}", log))
    assert ids <= restored, log[-3000:]


def test_a_damaged_worker_template_is_rebuilt_and_the_fanout_runs_anyway(wbackend: Backend) -> None:
    from snapkernel.fanout import remote

    @remote(workers=4, progress=False)
    def double(x: int) -> int:
        return x * 2

    key = str(wait_ready(wbackend, mode="worker")["key"])
    checkpoint = wbackend.state_dir / "templates" / key / "image" / "checkpoint.img"
    stat = checkpoint.stat()  # a flipped byte, its file's size and time kept: only the restore can tell
    with checkpoint.open("r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert double.map(range(4)) == [0, 2, 4, 6]  # its workers booted instead
    log = full_log(wbackend)
    # Dropped once, though all four workers were restoring it at the same time.
    assert log.count(f"template {key} dropped: restoring it failed") == 1, log[-3000:]
    assert wait_ready(wbackend, mode="worker")["key"] == key  # built again
    wait_running(wbackend, 4)
    remove_workers(wbackend)
    assert double.map(range(4)) == [0, 2, 4, 6]
    assert f"restored from worker template {key}" in full_log(wbackend)
    # Changed on disk while the backend is down: its SHA-256 no longer matches, so the next start removes it.
    wbackend.stop()
    pages = wbackend.state_dir / "templates" / key / "image" / "pages.img"
    with pages.open("r+b") as f:
        f.seek(pages.stat().st_size // 2)
        f.write(b"\0" * 16 + b"corrupt")
    wbackend.start()
    assert f"template {key} removed: image/pages.img does not match its SHA-256" in full_log(wbackend)
    assert wait_ready(wbackend, mode="worker")["key"] == key
    assert double.map(range(4)) == [0, 2, 4, 6]
