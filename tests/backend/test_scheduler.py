"""Resource accounting in-process (no sandbox): the totals it is given, refusals naming the limit, GPUs never
given twice under concurrent requests, and everything given back however a claim ends."""

from __future__ import annotations

import asyncio
import random

import pytest

from snapkernel.backend.scheduler import Scheduler
from snapkernel.errors import NoCapacityError
from snapkernel.host.gpus import GpuInfo
from snapkernel.host.resources import HostResources
from snapkernel.protocol.spec import ParsedSpec, parse_gpu

GIB = 1 << 30
H100S = tuple(GpuInfo(i, f"GPU-{i}", "NVIDIA H100 80GB HBM3", 80 * GIB) for i in range(4))
A100 = GpuInfo(4, "GPU-4", "NVIDIA A100-SXM4-80GB", 80 * GIB)


def spec(cpu: float = 1.0, memory: int = GIB, gpu: str = "") -> ParsedSpec:
    return ParsedSpec(gpu=parse_gpu(gpu), cpu=cpu, memory=memory, disk=GIB, runtime="process", image="",
                      restore_from="", hibernate_after=None, network=False)


def test_the_totals_are_the_hosts_it_is_given_not_this_machines() -> None:
    cap = Scheduler(HostResources(96, 512 * GIB, (*H100S, A100)), 2.0, 1.0).capacity()
    assert (cap.cpu_total, cap.cpu_limit, cap.memory_total, cap.memory_limit, cap.gpus_total) == (
        96, 192, 512 * GIB, 512 * GIB, 5)


def test_refusals_name_the_limit_and_nothing_is_claimed() -> None:
    s = Scheduler(HostResources(2, 4 * GIB, H100S[:1]), 1.0, 1.0)
    s.allocate("sb-a", spec(cpu=2, memory=2 * GIB, gpu="H100"))
    with pytest.raises(NoCapacityError, match=r"no room for 1 more cores: 2 are given out and the limit is 2"):
        s.allocate("sb-b", spec(cpu=1))
    with pytest.raises(NoCapacityError, match=r"no room for 3Gi more memory: .*memory is not overcommitted"):
        s.allocate("sb-b", spec(cpu=0.0, memory=3 * GIB))
    with pytest.raises(NoCapacityError, match=r"1 exist here and 0 are free"):
        s.allocate("sb-b", spec(cpu=0.0, gpu="H100"))
    with pytest.raises(NoCapacityError, match=r"no GPU of model 'V100' here; these exist: H100"):
        s.allocate("sb-b", spec(cpu=0.0, gpu="V100"))
    assert list(s.claims) == ["sb-a"] and s.gpu_owner == {0: "sb-a"}


def test_gpus_are_never_given_twice_under_concurrent_requests() -> None:
    s = Scheduler(HostResources(64, 1024 * GIB, (*H100S, A100)), 1.0, 1.0)
    held: dict[int, str] = {}
    got: list[str] = []

    async def kernel(n: int) -> None:
        sandbox = f"sb-{n:012d}"
        want = random.choice(["H100", "H100:2", "any", "A100"])
        for _ in range(20):
            try:
                indices = s.allocate(sandbox, spec(cpu=0.5, memory=GIB, gpu=want))
            except NoCapacityError:
                await asyncio.sleep(random.random() / 1000)
                continue
            for i in indices:  # nobody else holds what this one was given
                assert i not in held, (i, held[i], sandbox)
                held[i] = sandbox
            got.append(sandbox)
            await asyncio.sleep(random.random() / 1000)
            for i in indices:
                del held[i]
            s.release(sandbox)
            return

    async def run() -> None:
        await asyncio.gather(*(kernel(n) for n in range(200)))

    random.seed(7)
    asyncio.run(run())
    assert len(got) > 50  # most got their GPUs in turn
    assert s.claims == {} and s.gpu_owner == {} and s.capacity().cpu_allocated == 0


def test_everything_is_given_back_however_a_claim_ends() -> None:
    s = Scheduler(HostResources(8, 32 * GIB, H100S), 1.0, 1.0)
    s.allocate("sb-deleted", spec(cpu=2, memory=4 * GIB, gpu="H100:2"))
    s.claim("sb-readopted", 1, GIB, [2])  # re-adopted after a backend restart
    s.allocate("sb-suspended", spec(cpu=1, memory=GIB, gpu="H100"))
    s.release_gpus("sb-suspended")  # hibernated by suspend: GPUs back, cores and memory kept
    s.resize("sb-suspended", 9 * GIB)  # its GPU memory now lies in host memory
    assert s.capacity().gpus_allocated == 3 and s.memory_allocated == 4 * GIB + GIB + 9 * GIB
    for sandbox in ("sb-deleted", "sb-readopted", "sb-suspended", "sb-deleted"):  # twice is harmless
        s.release(sandbox)
    cap = s.capacity()
    assert (cap.cpu_allocated, cap.memory_allocated, cap.gpus_allocated) == (0, 0, 0)


def test_a_suspended_kernel_wakes_only_on_its_own_gpus_and_waits_its_turn() -> None:
    s = Scheduler(HostResources(8, 32 * GIB, H100S[:2]), 1.0, 1.0)
    s.claim("sb-sleeper", 1, GIB, [])
    s.allocate("sb-other", spec(cpu=1, gpu="H100"))  # takes GPU 0, which the sleeper had
    with pytest.raises(NoCapacityError, match="GPU 0 is held by sb-other"):
        s.claim_gpus("sb-sleeper", [0])
    heard: list[str] = []

    async def scenario() -> None:
        waiting = asyncio.ensure_future(
            s.wait_in_line("sb-sleeper", lambda: s.claim_gpus("sb-sleeper", [0]), heard.append, timeout=10))
        await asyncio.sleep(0.05)
        with pytest.raises(NoCapacityError, match="wait for GPUs ahead of this one"):
            s.allocate("sb-new", spec(cpu=1, gpu="H100"))  # GPU 1 is free, but the sleeper is first in line
        s.release("sb-other")
        await asyncio.wait_for(waiting, 5)

    asyncio.run(scenario())
    assert s.gpu_owner == {0: "sb-sleeper"} and heard and "position 1 of 1" in heard[0]


def test_freeing_a_sandbox_is_only_worth_it_when_the_request_would_then_fit() -> None:
    """What the warm pool asks before it gives a pool sandbox's room to a request (nothing changes meanwhile)."""
    s = Scheduler(HostResources(2, 4 * GIB, H100S[:1]), 1.0, 1.0)
    s.allocate("sb-pool", spec(cpu=1, memory=2 * GIB))  # a warm pool sandbox: no GPU
    s.allocate("sb-gpu", spec(cpu=1, memory=GIB, gpu="H100"))
    assert s.fits_without("sb-new", spec(cpu=1, memory=2 * GIB), "sb-pool")
    assert not s.fits_without("sb-new", spec(cpu=1, memory=GIB, gpu="H100"), "sb-pool")  # short of a GPU
    assert not s.fits_without("sb-new", spec(cpu=1, memory=4 * GIB), "sb-pool")  # short even then
    assert (s.cpu_allocated, s.memory_allocated) == (2, 3 * GIB)  # the pool sandbox still holds its claim
