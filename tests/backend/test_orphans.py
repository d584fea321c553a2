"""Kernels no client has attached to for `orphan_timeout` seconds are hibernated (else removed); attached
kernels and fan-out workers are left alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from snapkernel.backend.orphans import OrphanReaper, check_interval
from snapkernel.backend.sandbox import LiveSandbox
from snapkernel.backend.sandbox_db import SandboxRecord
from snapkernel.backend.workers import MODE_ENV
from snapkernel.protocol.spec import parse_spec
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.backend.test_hibernation import get, sandbox_of, wait_state
from tests.conftest import RUNTIMES, Backend, backend_of_its_own
from tests.kernel_provisioner.kernel_helpers import running_kernel, value
from tests.snapshots.test_memory import backend_call

TIMEOUT = 2.0


@pytest.fixture(params=RUNTIMES)
def orphan_backend(request: pytest.FixtureRequest, kernelspec_dir: Path,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    with backend_of_its_own(request.param, monkeypatch, "snapkernel-orphans-",
                            [f"--BackendApp.orphan_timeout={TIMEOUT}"]) as b:
        yield b


def test_a_kernel_without_a_client_hibernates_and_an_attached_one_stays(orphan_backend: Backend) -> None:
    with running_kernel() as (_km, kc):  # attached: Jupyter's kernel manager holds the relay
        kept = sandbox_of(kc)
        orphan = backend_call(orphan_backend, lambda c: c.create_sandbox(pb.CreateSandboxRequest(
            kernel_id="gone", kernel=pb.KernelConfig(key=b"k")))).id  # nobody ever attaches to this one
        wait_state(orphan_backend, orphan, pb.RUNNING)
        started = time.monotonic()
        deadline = started + 30
        while (sb := get(orphan_backend, orphan)).state not in (pb.HIBERNATED, pb.DELETED):
            assert time.monotonic() < deadline, f"still {pb.SandboxState.Name(sb.state)}: {sb.message}"
            time.sleep(0.2)
        assert "no client attached" in orphan_backend.read_log()
        assert f"sandbox_id={orphan} kernel_id=gone hibernated" in orphan_backend.read_log()
        time.sleep(max(0.0, TIMEOUT + 2 * check_interval(TIMEOUT) - (time.monotonic() - started)))
        assert get(orphan_backend, kept).state == pb.RUNNING
        assert value(kc, "1 + 1") == "2"


def _sandbox(state: int, env: dict[str, str] | None = None, detached_for: float = 10.0) -> LiveSandbox:
    spec = pb.SandboxSpec(env=env or {})
    record = SandboxRecord(id="sb-000000000000", kernel_id="k", runtime="process", spec=spec, dir="/nowhere",
                           state=state)
    sb = LiveSandbox(record, parse_spec(spec, default_runtime="process", default_cpu=1.0, default_memory=1 << 30,
                                        default_disk=1 << 30))
    sb.detached_at = time.time() - detached_for
    return sb


def test_only_idle_unattached_kernels_count_as_orphans() -> None:
    attached = _sandbox(pb.RUNNING)
    attached.attached.add(object())  # type: ignore[arg-type]
    busy = _sandbox(pb.RUNNING)
    busy.busy = True
    cases = {
        "orphan": _sandbox(pb.RUNNING), "exited kernel": _sandbox(pb.KERNEL_EXITED),
        "attached": attached, "busy": busy, "recent": _sandbox(pb.RUNNING, detached_for=1.0),
        "worker": _sandbox(pb.RUNNING, {MODE_ENV: "worker"}), "clone": _sandbox(pb.RUNNING, {MODE_ENV: "clone"}),
        "hibernated": _sandbox(pb.HIBERNATED), "starting": _sandbox(pb.STARTING), "ended": _sandbox(pb.EXITED),
    }
    reaper = OrphanReaper(SimpleNamespace(live=cases), timeout=5.0)  # type: ignore[arg-type]
    orphans = {id(sb) for sb in reaper.orphans(time.time())}
    found = {name for name, sb in cases.items() if id(sb) in orphans}
    assert found == {"orphan", "exited kernel"}
    assert check_interval(3600) == 60 and check_interval(2) == 0.5
