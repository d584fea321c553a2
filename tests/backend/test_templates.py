"""Template snapshots on a real gvisor backend: kernels restore a memory image of a freshly booted sandbox,
each with its own identity; a damaged template is rebuilt and never fails a kernel."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient

from tests.conftest import Backend, backend_of_its_own, sandbox_processes
from tests.kernel_provisioner.kernel_helpers import run, running_kernel, value, write_kernelspec

pytestmark = pytest.mark.gvisor


def templates(backend: Backend, mode: str | None = "kernel") -> list[dict[str, object]]:
    """The backend's templates of kernels (or of fan-out workers, or with `mode=None` all), as JSON."""
    from google.protobuf.json_format import MessageToDict

    from snapkernel.client import BackendClient

    async def status() -> list[dict[str, object]]:
        client = BackendClient(backend.address, backend.token)
        try:
            return [MessageToDict(t, preserving_proto_field_name=True) for t in (await client.status()).templates
                    if mode is None or t.mode == mode]
        finally:
            await client.close()

    return asyncio.run(status())


def wait_ready(backend: Backend, timeout: float = 90, mode: str = "kernel") -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready = [t for t in templates(backend, mode) if t["state"] == "ready"]
        if ready:
            return ready[0]
        time.sleep(0.5)
    raise AssertionError(f"no {mode} template ready after {timeout:g}s: {templates(backend, None)}; log:\n"
                         f"{backend.read_log()}")


@pytest.fixture
def tbackend(monkeypatch: pytest.MonkeyPatch, kernelspec_dir: Path) -> Iterator[Backend]:
    """A gvisor backend with templates on: the default spec's is built at start."""
    write_kernelspec(kernelspec_dir, "snapkernel-test-template", {"runtime": "gvisor"})
    with backend_of_its_own("gvisor", monkeypatch, args=["--BackendApp.templates=True",
                                                         "--BackendApp.warm_pool=0"]) as b:
        yield b


def full_log(backend: Backend) -> str:
    return (backend.state_dir / "backend.log").read_text(errors="replace")


def sandbox_id(c: BlockingKernelClient) -> str:
    return value(c, "__import__('os').environ['SNAPKERNEL_SANDBOX_ID']").strip("'")


def test_kernels_restore_the_template_each_with_its_own_identity(tbackend: Backend) -> None:
    template = wait_ready(tbackend)
    assert template["spec"] == "cpu 1, memory 4Gi, disk 10Gi" and int(str(template["size"])) > 1 << 20
    with running_kernel("snapkernel-test-template") as (km1, c1), \
            running_kernel("snapkernel-test-template") as (km2, c2):
        assert km1.session.key != km2.session.key
        run(c1, "secret = 'only in the first'")
        ids = {sandbox_id(c1), sandbox_id(c2)}
        assert len(ids) == 2 and all(i.startswith("sb-") for i in ids)
        assert value(c2, "'secret' in globals()") == "False"
        # Each kernel signs with its own key (which its environment never shows).
        assert value(c1, "get_ipython().kernel.session.key") == repr(km1.session.key)
        assert value(c1, "'SNAPKERNEL_KERNEL_KEY' in __import__('os').environ") == "False"
        # A message signed with the other kernel's key is dropped by this one.
        forged = km2.client()
        forged.session.key = km1.session.key
        forged.start_channels()
        try:
            with pytest.raises(TimeoutError):
                forged.execute_interactive("1", timeout=5)
        finally:
            forged.stop_channels()
        assert value(c2, "'still answers'") == "'still answers'"
        # A restart in place keeps the kernel's own key.
        km1.restart_kernel()
        c1.wait_for_ready(timeout=60)
        assert value(c1, "1 + 1") == "2"
    log = full_log(tbackend)
    assert log.count(f"restored from template {template['key']}") == 2, log
    assert [t["used"] for t in templates(tbackend)] == ["2"]


def test_a_template_being_built_is_never_listed_nor_left_after_a_stop(tbackend: Backend) -> None:
    from snapkernel.client import BackendClient

    async def listed() -> list[str]:
        client = BackendClient(tbackend.address, tbackend.token)
        try:
            return [s.id for s in await client.list_sandboxes(include_ended=True)]
        finally:
            await client.close()

    assert [t["state"] for t in templates(tbackend)] == ["building"]  # at start, the default spec's
    assert asyncio.run(listed()) == []
    tbackend.stop()  # half-way through the build
    assert sandbox_processes(str(tbackend.state_dir)) == []
    tbackend.start()
    wait_ready(tbackend)
    tbackend.restart()
    assert wait_ready(tbackend, timeout=10)["state"] == "ready"  # loaded and checked, not built again
    assert full_log(tbackend).count(" ready (cpu 1, memory 4Gi") == 1
    assert asyncio.run(listed()) == []


def test_a_damaged_template_is_rebuilt_and_the_kernel_starts_anyway(tbackend: Backend) -> None:
    key = str(wait_ready(tbackend)["key"])
    checkpoint = tbackend.state_dir / "templates" / key / "image" / "checkpoint.img"
    # A flipped byte, its file's size and time kept: only the restore can tell.
    stat = checkpoint.stat()
    with checkpoint.open("r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with running_kernel("snapkernel-test-template") as (_km, c):
        assert value(c, "6 * 7") == "42"
    log = full_log(tbackend)
    assert f"template {key} dropped: restoring it failed" in log, log
    assert wait_ready(tbackend)["key"] == key  # built again, for the next kernel
    # Changed on disk while the backend is down: its SHA-256 no longer matches, so the next start removes it.
    tbackend.stop()
    pages = tbackend.state_dir / "templates" / key / "image" / "pages.img"
    with pages.open("r+b") as f:
        f.seek(pages.stat().st_size // 2)
        f.write(b"\0" * 16 + b"corrupt")
    tbackend.start()
    assert f"template {key} removed: image/pages.img does not match its SHA-256" in full_log(tbackend)
    assert wait_ready(tbackend)["key"] == key
    with running_kernel("snapkernel-test-template") as (_km, c):
        assert value(c, "6 * 7") == "42"


def test_other_specs_boot_and_get_a_template_of_their_own(tbackend: Backend, kernelspec_dir: Path) -> None:
    wait_ready(tbackend)
    write_kernelspec(kernelspec_dir, "snapkernel-test-template-2g", {"runtime": "gvisor", "memory": "2Gi"})
    write_kernelspec(kernelspec_dir, "snapkernel-test-template-env", {"runtime": "gvisor", "env": {"A": "b"}})
    with running_kernel("snapkernel-test-template-2g") as (_km, c):
        assert value(c, "1") == "1"  # booted: its class had no template yet
    deadline = time.monotonic() + 90
    while len([t for t in templates(tbackend) if t["state"] == "ready"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sorted(str(t["spec"]) for t in templates(tbackend)) == ["cpu 1, memory 2Gi, disk 10Gi",
                                                                   "cpu 1, memory 4Gi, disk 10Gi"]
    with running_kernel("snapkernel-test-template-2g") as (_km, c):
        assert value(c, "int(open('/sys/fs/cgroup/pids/pids.max').read())") == "38"  # its class's own limit
    with running_kernel("snapkernel-test-template-env") as (_km, c):  # variables of its own: it boots
        assert value(c, "__import__('os').environ['A']") == "'b'"
    assert full_log(tbackend).count("restored from template") == 1


@pytest.fixture
def pbackend(monkeypatch: pytest.MonkeyPatch, kernelspec_dir: Path) -> Iterator[Backend]:
    """A gvisor backend with a warm pool of one sandbox of the default spec."""
    write_kernelspec(kernelspec_dir, "snapkernel-test-template", {"runtime": "gvisor"})
    with backend_of_its_own("gvisor", monkeypatch, args=["--BackendApp.templates=True",
                                                         "--BackendApp.warm_pool=1",
                                                         "--BackendApp.memory_overcommit=1"]) as b:
        yield b


def pooled(backend: Backend, count: int = 1, timeout: float = 120) -> list[str]:
    """The sandboxes that have waited in the pool, once `count` of them have."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = re.findall(r"sandbox_id=(sb-\w+) waits in the warm pool", full_log(backend))
        if len(ids) >= count:
            return ids
        time.sleep(0.3)
    raise AssertionError(f"the pool did not fill {count} times: {full_log(backend)[-3000:]}")


def test_the_warm_pool_hands_each_sandbox_out_once_and_refills(pbackend: Backend) -> None:
    first = pooled(pbackend)[0]
    with running_kernel("snapkernel-test-template") as (km1, c1), \
            running_kernel("snapkernel-test-template") as (km2, c2):
        assert sandbox_id(c1) == first  # from the pool
        assert sandbox_id(c2) != first  # the pool had one: this one restored the template
        for km, c in ((km1, c1), (km2, c2)):
            assert value(c, "get_ipython().kernel.session.key") == repr(km.session.key)
        assert value(c1, "'pool' in globals()") == "False" and value(c1, "1 + 1") == "2"
        second = pooled(pbackend, 2)[1]  # refilled in the background
        assert second not in (first, sandbox_id(c2))
    assert "from the warm pool" in full_log(pbackend)
    out = subprocess.run([sys.executable, "-m", "snapkernel.cli", "status"], capture_output=True, text=True,
                         check=True, env={**os.environ, **pbackend.env()}).stdout
    assert re.search(r"warm pool: [01] of 1 ready, 1 handed out", out), out
    pbackend.stop()
    assert sandbox_processes(str(pbackend.state_dir)) == []  # the pool's too


def test_the_warm_pool_gives_its_room_to_a_request_that_needs_it(pbackend: Backend,
                                                                  kernelspec_dir: Path) -> None:
    from snapkernel.client import BackendClient

    async def capacity() -> tuple[int, int]:
        client = BackendClient(pbackend.address, pbackend.token)
        try:
            cap = (await client.status()).capacity
            return cap.memory_total, cap.memory_allocated
        finally:
            await client.close()

    pooled(pbackend)
    deadline = time.monotonic() + 60
    while (now := asyncio.run(capacity()))[1] != 4 << 30 and time.monotonic() < deadline:
        time.sleep(0.2)  # the worker template's own sandbox may still be there, just built
    total, allocated = now
    assert allocated == 4 << 30  # the pool's sandbox counts
    big = (total - (2 << 30)) >> 20  # fits only once the pool's sandbox is gone
    write_kernelspec(kernelspec_dir, "snapkernel-test-big", {"runtime": "gvisor", "memory": f"{big}Mi"})
    with running_kernel("snapkernel-test-big") as (_km, c):
        assert value(c, "1") == "1"
        assert asyncio.run(capacity())[1] == big << 20
    assert "removed from the warm pool: a request needs its room" in full_log(pbackend)
    pooled(pbackend, 2)  # and it fills again once there is room


def test_a_warm_pool_of_another_class_serves_that_class_only(monkeypatch: pytest.MonkeyPatch,
                                                             kernelspec_dir: Path) -> None:
    write_kernelspec(kernelspec_dir, "snapkernel-test-pool-2g", {"runtime": "gvisor", "memory": "2Gi"})
    write_kernelspec(kernelspec_dir, "snapkernel-test-pool-default", {"runtime": "gvisor"})
    with backend_of_its_own("gvisor", monkeypatch, args=[
            "--BackendApp.templates=True", "--BackendApp.warm_pool=0",
            '--BackendApp.warm_pool_classes={"memory": "2Gi", "size": 1}']) as b:
        first = pooled(b)[0]
        with running_kernel("snapkernel-test-pool-default") as (_, c):
            assert sandbox_id(c) != first  # the default spec has no pool here
        with running_kernel("snapkernel-test-pool-2g") as (_, c):
            assert sandbox_id(c) == first  # its class's pool
            assert value(c, "1 + 1") == "2"
        out = subprocess.run([sys.executable, "-m", "snapkernel.cli", "status"], capture_output=True, text=True,
                             check=True, env={**os.environ, **b.env()}).stdout
        assert re.search(r"warm pool: [01] of 1 ready, 1 handed out", out), out
        b.stop()
        assert sandbox_processes(str(b.state_dir)) == []
