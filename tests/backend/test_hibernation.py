"""Hibernation of idle kernels: they give their resources back and the next cell wakes them, variables intact."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from snapkernel.errors import StateError
from snapkernel.protocol.v1 import backend_pb2 as pb
from tests.conftest import Backend
from tests.kernel_provisioner.kernel_helpers import reply_to, run, running_kernel, value, write_kernelspec
from tests.snapshots.test_memory import backend_call

METHOD = {"process": "state", "gvisor": "memory"}  # how a CPU kernel hibernates on each runtime


def get(backend: Backend, sandbox: str) -> pb.Sandbox:
    result: pb.Sandbox = backend_call(backend, lambda c: c.get_sandbox(sandbox))
    return result


def wait_state(backend: Backend, sandbox: str, state: int, timeout: float = 60) -> pb.Sandbox:
    deadline = time.monotonic() + timeout
    while (sb := get(backend, sandbox)).state != state:
        assert time.monotonic() < deadline, f"sandbox stayed {pb.SandboxState.Name(sb.state)}: {sb.message}"
        time.sleep(0.2)
    return sb


def sandbox_of(kc) -> str:  # type: ignore[no-untyped-def]
    run(kc, "import os")
    return value(kc, "os.environ['SNAPKERNEL_SANDBOX_ID']").strip("'")


def test_idle_kernel_hibernates_and_the_next_cell_wakes_it(backend: Backend, kernelspec_dir: Path) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-hibernate", {"hibernate_after": 1})
    before: pb.Status = backend_call(backend, lambda c: c.status())
    with running_kernel(name) as (km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "import numpy\nx = 41\nbig = numpy.arange(1_000_000)\nopen('kept.txt', 'w').write('k')")
        sb = wait_state(backend, sandbox, pb.HIBERNATED)
        assert sb.hibernation == METHOD[backend.runtime]
        assert sb.hibernate_after == 1
        assert km.is_alive()  # to Jupyter a hibernated kernel is alive (its restarter must not step in)
        status: pb.Status = backend_call(backend, lambda c: c.status())
        assert status.capacity.cpu_allocated == before.capacity.cpu_allocated  # it gave its cores back
        listed = json.loads(subprocess.run(
            [sys.executable, "-m", "snapkernel.cli", "sandboxes", "list", "--json"], capture_output=True,
            text=True, check=True, env={**backend.env(), "PATH": "/usr/bin:/bin"}).stdout)
        assert {"id": sandbox, "state": "hibernated"}.items() <= next(s for s in listed if s["id"] == sandbox).items()

        assert value(kc, "x + 1") == "42"  # this cell woke it
        assert value(kc, "int(big.sum())") == str(sum(range(1_000_000)))
        assert value(kc, "open('kept.txt').read()") == "'k'"
        sb = get(backend, sandbox)
        assert sb.state == pb.RUNNING and sb.hibernation == "" and km.is_alive()


@pytest.mark.parametrize("backend", [pytest.param("gvisor", marks=pytest.mark.gvisor)], indirect=True)
def test_memory_hibernation_keeps_what_pickling_cannot(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "import threading\ngen = iter(range(10))\nfirst = next(gen)\nlock = threading.Lock()")
        sb = backend_call(backend, lambda c: c.hibernate_sandbox(sandbox))
        assert sb.state == pb.HIBERNATED and sb.hibernation == "memory"
        assert value(kc, "next(gen)") == "1"
        assert value(kc, "lock.acquire(blocking=False)") == "True"


def test_hibernate_and_wake_calls(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "y = 'still here'")
        with pytest.raises(StateError, match="not hibernated"):
            backend_call(backend, lambda c: c.wake_sandbox(sandbox))
        assert backend_call(backend, lambda c: c.hibernate_sandbox(sandbox)).state == pb.HIBERNATED
        with pytest.raises(StateError, match="only a running kernel can hibernate"):
            backend_call(backend, lambda c: c.hibernate_sandbox(sandbox))
        woken = backend_call(backend, lambda c: c.wake_sandbox(sandbox))
        assert woken.state == pb.RUNNING
        assert value(kc, "y") == "'still here'"


def test_a_busy_kernel_does_not_hibernate(backend: Backend, kernelspec_dir: Path) -> None:
    name = write_kernelspec(kernelspec_dir, "snapkernel-test-hibernate", {"hibernate_after": 1})
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        msg_id = kc.execute("import time\ntime.sleep(4)\n'done'")
        time.sleep(2.5)
        assert get(backend, sandbox).state == pb.RUNNING  # idle for longer than 1 s, but a cell runs
        with pytest.raises(StateError, match="busy"):
            backend_call(backend, lambda c: c.hibernate_sandbox(sandbox))
        assert reply_to(kc, msg_id)["content"]["status"] == "ok"
        wait_state(backend, sandbox, pb.HIBERNATED)


@pytest.mark.parametrize("backend", ["process"], indirect=True)
def test_state_hibernation_refuses_what_it_cannot_save(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "gen = (i for i in range(3))")
        with pytest.raises(StateError, match="gen"):
            backend_call(backend, lambda c: c.hibernate_sandbox(sandbox))
        sb = get(backend, sandbox)
        assert sb.state == pb.RUNNING and "stays awake" in sb.message
        assert value(kc, "next(gen)") == "0"


@pytest.mark.parametrize("backend", ["process"], indirect=True)
def test_a_failed_wake_says_why_in_the_notebook(backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "z = 1")
        backend_call(backend, lambda c: c.hibernate_sandbox(sandbox))
        shutil.rmtree(backend.state_dir / "sandboxes" / sandbox / "workspace" / ".snapkernel-hibernation")
        content, outputs = run(kc, "z")
        assert content["status"] == "error" and content["ename"] == "KernelWakeError"
        assert any("waking this kernel failed" in m["content"].get("text", "") for m in outputs)
        sb = get(backend, sandbox)
        assert sb.state == pb.FAILED and "waking this kernel failed" in sb.message


def test_a_hibernated_kernel_survives_a_backend_restart(own_backend: Backend) -> None:
    with running_kernel() as (_km, kc):
        sandbox = sandbox_of(kc)
        run(kc, "w = [1, 2, 3]")
        backend_call(own_backend, lambda c: c.hibernate_sandbox(sandbox))
        own_backend.restart()
        assert get(own_backend, sandbox).state == pb.HIBERNATED
        assert value(kc, "sum(w)", timeout=60) == "6"


def test_scheduler_hands_released_gpus_to_the_line_in_order() -> None:
    from snapkernel.backend.scheduler import Scheduler
    from snapkernel.errors import NoCapacityError
    from snapkernel.host.gpus import GpuInfo
    from snapkernel.host.resources import HostResources
    from snapkernel.protocol.spec import parse_gpu

    sched = Scheduler(HostResources(8, 64 << 30, (GpuInfo(0, "GPU-0", "NVIDIA H100 80GB HBM3", 80 << 30),)), 1.0, 1.0)
    sched.claim("sb-holder", 0, 0, [0])
    heard: list[str] = []

    async def scenario() -> list[str]:
        order: list[str] = []

        async def wake(name: str) -> None:
            await sched.wait_in_line(name, lambda: sched.claim_gpus(name, [0]), heard.append, timeout=10)
            order.append(name)
            await asyncio.sleep(0.05)
            sched.release_gpus(name)

        first = asyncio.create_task(wake("sb-first"))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(wake("sb-second"))
        await asyncio.sleep(0.05)
        spec = type("Spec", (), {"cpu": 0.0, "memory": 0, "gpu": parse_gpu("H100")})()
        with pytest.raises(NoCapacityError, match="wait for GPUs ahead"):
            sched.allocate("sb-new", spec)  # type: ignore[arg-type]  # nobody jumps the line
        sched.release_gpus("sb-holder")
        await asyncio.gather(first, second)
        return order

    assert asyncio.run(scenario()) == ["sb-first", "sb-second"]
    assert any("GPU 0 is held by sb-holder" in h and "position 1 of" in h for h in heard)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["process"], indirect=True)
def test_a_gpu_kernel_suspends_gives_its_gpu_back_and_wakes_bit_identical(backend: Backend,
                                                                          kernelspec_dir: Path) -> None:
    from snapkernel.host.processes import sample_tree
    from snapkernel.snapshots import cuda

    name = write_kernelspec(kernelspec_dir, "snapkernel-test-gpu-hibernate", {"gpu": "any:1", "runtime": "process"})
    with running_kernel(name) as (_km, kc):
        sandbox = sandbox_of(kc)
        assert get(backend, sandbox).hibernate_after == 600  # GPU kernels hibernate by default
        # torch tensors take the pinned path; the cupy array is left to the driver's checkpoint.
        run(kc, "import torch, cupy\nt = torch.randn(256 << 20, device='cuda')\nview = t[1::2]\n"
                "c = cupy.arange(1 << 26, dtype=cupy.float32)\nsums = (float(t.double().sum()), float(c.sum()))",
            timeout=180)
        sb = backend_call(backend, lambda c: c.hibernate_sandbox(sandbox))
        assert sb.state == pb.HIBERNATED and sb.hibernation == "suspend", sb.message
        status: pb.Status = backend_call(backend, lambda c: c.status())
        assert status.capacity.gpus_allocated == 0  # the GPU went back to the scheduler
        held = cuda.gpu_memory_of(sample_tree(sb.pid).pids, list(sb.gpu_indices))
        assert sum(held.values()) < 64 << 20, held  # and the kernel holds (next to) no GPU memory
        print("GPU memory held while suspended:", held)
        assert value(kc, "(float(t.double().sum()), float(c.sum())) == sums", timeout=120) == "True"
        assert value(kc, "view.data_ptr() == t.data_ptr() + 4 and bool((view == t[1::2]).all())") == "True"
        assert get(backend, sandbox).state == pb.RUNNING
