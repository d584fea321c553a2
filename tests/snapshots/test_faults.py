"""Snapshots under stress: requested while a cell runs, and the backend killed in the middle of one."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from pathlib import Path

import pytest

from snapkernel.client import BackendClient
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import reply_to, run, running_kernel, value
from tests.snapshots.test_memory import backend_call


@pytest.mark.parametrize("kind", ["state", pytest.param("memory", marks=pytest.mark.gvisor)])
def test_snapshot_requested_while_a_cell_runs(backend: Backend, kind: str) -> None:
    if kind == "memory" and backend.runtime != "gvisor":
        pytest.skip("memory snapshots are gvisor's")
    with running_kernel() as (_km, kc):
        run(kc, "import os, time\ncounter = 0")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")
        msg_id = kc.execute("for _ in range(30):\n    counter += 1\n    time.sleep(0.1)")
        time.sleep(0.5)
        started = time.monotonic()
        snap = backend_call(backend, lambda c: c.create_snapshot(sandbox, kind))
        elapsed = time.monotonic() - started
        assert reply_to(kc, msg_id, timeout=30)["content"]["status"] == "ok"
        assert value(kc, "counter") == "30"
        if kind == "state":  # waits for the cell to end, so it holds the finished loop's result
            assert elapsed > 1.5
        assert snap.id in [s.id for s in backend_call(backend, lambda c: c.list_snapshots())]


@pytest.mark.parametrize("own_backend", [pytest.param("gvisor", marks=pytest.mark.gvisor)], indirect=True)
def test_backend_killed_mid_snapshot_loses_nothing_else(own_backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        run(kc, "import os, numpy\nbig = numpy.ones(256 * 2**20, dtype=numpy.uint8)\nkept = 'yes'")
        sandbox = value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")

        def snapshot() -> None:
            async def go() -> None:
                client = BackendClient(own_backend.address, own_backend.token)
                try:
                    await client.create_snapshot(sandbox)
                except Exception:
                    pass  # the backend dies under it
                finally:
                    await client.close()
            asyncio.run(go())

        t = threading.Thread(target=snapshot)
        t.start()
        snapshots = own_backend.state_dir / "snapshots"
        deadline = time.monotonic() + 20
        while not list(snapshots.glob(".partial-*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(snapshots.glob(".partial-*")), "the snapshot never started"
        own_backend.stop(signal.SIGKILL)
        t.join(30)
        own_backend.start()
        assert not list(snapshots.glob(".partial-*"))  # the half-written snapshot is gone
        assert backend_call(own_backend, lambda c: c.list_snapshots()) == []
        assert value(kc, "kept", timeout=60) == "'yes'"  # the kernel kept running
        snap = backend_call(own_backend, lambda c: c.create_snapshot(sandbox))
        assert Path(snapshots / snap.id).is_dir()
